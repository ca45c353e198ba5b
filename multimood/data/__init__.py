"""Data: the datasets builder of the record JSONL, corpus converters (MESC, ESConv) and the bad-sample screen."""
