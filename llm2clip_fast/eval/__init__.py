"""Evaluation of saved LLM2CLIP models, usable without the trainer.

- :mod:`~llm2clip_fast.eval.held_out`: retrieval, CRA and zero-shot accuracy on a held-out caption
  source (:func:`~llm2clip_fast.eval.held_out.evaluate_model_dir`);
- :mod:`~llm2clip_fast.eval.suites`: published benchmarks (Flickr30k, COCO, Urban-1k, DOCCI,
  ShareGPT4V-1k retrieval; ImageNet and class-per-folder zero-shot) with each one's protocol;
- :mod:`~llm2clip_fast.eval.retrieval_metrics`: recall@K, CRA and top-K accuracy with ties counted by
  their expectation;
- :mod:`~llm2clip_fast.eval.text_encoder`: the frozen LLM a model's config records, loaded as recorded;
- :mod:`~llm2clip_fast.eval.results_files`: the JSON result files.

``python -m llm2clip_fast.train eval`` is the command line over them (``llm2clip_fast/train/eval.py``).
"""
