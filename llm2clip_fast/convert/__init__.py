"""Importing released and pretrained checkpoints as :class:`~llm2clip_fast.models.llm2clip.LLM2CLIPModel`
folders (``python -m llm2clip_fast.convert``).

- :func:`~llm2clip_fast.convert.llm2clip_hf.convert_llm2clip_hf`: a released HF-format LLM2CLIP folder;
- :func:`~llm2clip_fast.convert.eva_clip.convert_eva_clip`: an EVA-CLIP-style LLM2CLIP state dict, its EVA02
  tower as a timm tower (:mod:`llm2clip_fast.convert.eva_clip_vision`);
- :func:`~llm2clip_fast.convert.hf_clip.convert_hf_clip`: a transformers CLIP folder whose vision
  tower (and optionally its projection) starts stage 2;
- :func:`~llm2clip_fast.convert.open_clip_import.convert_open_clip`: the same from an OpenCLIP ViT CLIP
  (hub folder or state dict), and :func:`~llm2clip_fast.convert.open_clip_export.export_open_clip` the
  way back (the vision side as an OpenCLIP state dict);
- :func:`~llm2clip_fast.convert.output_folder.write_model_folder`: the atomic folder write.

Every mapping is strict (:mod:`llm2clip_fast.convert.strict_mapping`) and keeps the source dtype.
"""
