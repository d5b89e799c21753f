"""Evaluation of samples and denoisers (Sec 6.1 "Metrics", Sec 7.5, App C.2, C.3).

- ``featurizers``: text → vector for MAUVE (``get_featurizer``: minilm offline, gpt2-large, local HF dir);
- ``mauve``: ``mauve_score`` (mean ± std over k-means seeds), ``ReferenceSet`` (seeded draw without
  replacement), ``evaluate_mauve`` (length-matched samples vs references);
- ``feature_cache``: reference features cached on disk or S3;
- ``genppl``: generative perplexity under an exact source, an AR checkpoint or an HF causal LM;
- ``entropy``: sentence entropy of token-id histograms;
- ``calibration``: token ECE and reliability diagrams under teacher forcing on corrupted inputs;
- ``likelihood``: NLL / bits per character through the path integral.

Submodules are imported explicitly (``from dsl.eval.mauve import mauve_score``): transformers and
mauve-text load only when used. The parallel pool is ``dsl.service.mauve_pool.MauvePool``.
"""
