"""The model as the Hub ships it: configuration, modeling, processing, records, media and pipeline.

These files are copied flat into every saved model folder (remote code), so they import only each other
(relative, sibling imports), transformers and the field's libraries, never the rest of `multimood`.
"""
