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

BERT = FAMILIES[0]

BertModel = native_base_class(BERT)
BertForPreTraining = native_head_class(hf.BertForPreTraining)
BertForMaskedLM = native_head_class(hf.BertForMaskedLM)
BertForNextSentencePrediction = native_head_class(hf.BertForNextSentencePrediction)
BertForSequenceClassification = native_head_class(hf.BertForSequenceClassification)
BertForTokenClassification = native_head_class(hf.BertForTokenClassification)
BertForQuestionAnswering = native_head_class(hf.BertForQuestionAnswering)
BertForMultipleChoice = native_head_class(hf.BertForMultipleChoice)
