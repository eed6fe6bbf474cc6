"""fastbert's BERT classes: transformers' BertModel and heads with the fast encoder forward.

The classes are built from the family table (fastbert.models.families) by fastbert.models.native,
as every family's are; they are spelled out here so that BERT-specific mixins (a head computing the
MLM loss on masked positions only) can be added with one argument: native_head_class(hf, extra_bases).
"""
from __future__ import annotations

from transformers.models.bert import modeling_bert as hf

from fastbert.models.families import FAMILIES
from fastbert.models.loading import MissingWeightsError  # noqa: F401  (historical home of the error)
from fastbert.models.native import native_base_class, native_head_class
from fastbert.models.sparse_mlm import SparseMLMHeadMixin

BERT = FAMILIES[0]

BertModel = native_base_class(BERT)
# model.sparse_mlm_head = True: the MLM head only at labelled positions (fastbert.models.sparse_mlm)
BertForPreTraining = native_head_class(hf.BertForPreTraining, (SparseMLMHeadMixin,))
BertForMaskedLM = native_head_class(hf.BertForMaskedLM, (SparseMLMHeadMixin,))
BertForNextSentencePrediction = native_head_class(hf.BertForNextSentencePrediction)
BertForSequenceClassification = native_head_class(hf.BertForSequenceClassification)
BertForTokenClassification = native_head_class(hf.BertForTokenClassification)
BertForQuestionAnswering = native_head_class(hf.BertForQuestionAnswering)
BertForMultipleChoice = native_head_class(hf.BertForMultipleChoice)
