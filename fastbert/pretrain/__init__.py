"""`fastbert pretrain`: BERT pretraining (MLM, with or without NSP) on plain text, on HF datasets and Trainer."""
