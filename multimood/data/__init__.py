"""Data: the record files' reader and writer (`record_files`), the datasets builder and `multimood data`
(`dataset_builder`), the MESC / ESConv converters (`corpora`) and the bad-sample screen (`bad_samples`)."""
