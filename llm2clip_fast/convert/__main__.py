"""``python -m llm2clip_fast.convert``: turn a released or pretrained checkpoint into an LLM2CLIPModel folder.

  --from llm2clip-hf SRC --out DST   a released HF-format LLM2CLIP folder (microsoft/LLM2CLIP-Openai-*):
                                     vision tower, projection, text adapter, logit scale
  --from eva-clip FILE --out DST [--model NAME | --model-config JSON]
                                     an EVA-CLIP-style LLM2CLIP state dict (microsoft/LLM2CLIP-EVA02-*):
                                     the EVA02 tower as a timm tower, visual.head as the projection, text
                                     adapter, logit scale; NAME one of EVA02-CLIP-B-16, EVA02-CLIP-L-14,
                                     EVA02-CLIP-L-14-336 (default: the one the tensor sizes match); needs
                                     timm (pip install "llm2clip_fast[timm]"). A plain EVA-CLIP file
                                     (EVA02_CLIP_L_336_psz14_s6B.pt, where the official run.sh starts) takes
                                     --llm-dim N [--embed-dim E]: its tower and logit scale, a new adapter
                                     and a new head initialised as the official one
  --from hf-clip SRC --out DST --llm-dim N (--embed-dim E | --keep-projection)
                                     a transformers CLIP folder: its vision tower (and with
                                     --keep-projection its projection) plus a new adapter, for stage 2
  --from open_clip SRC --out DST --llm-dim N (--embed-dim E | --keep-projection) [--heads H --act A]
                                     the same from an OpenCLIP ViT CLIP: a hub-style folder
                                     (open_clip_config.json + open_clip_model.safetensors) or a state-dict
                                     file (.safetensors/.bin/.pt; then --heads and --act are needed)
  --to open_clip SRC --out FILE.safetensors
                                     the vision side of one of our LLM2CLIPModel folders as an OpenCLIP
                                     state dict (visual.*, logit_scale) + open_clip_config.json beside it

Only config files, safetensors and (OpenCLIP, EVA-CLIP) pickles through torch.load(weights_only=True) are
read; no code from the source runs. The result loads with ``LLM2CLIPModel.from_pretrained(DST)`` and continues
training with ``python -m llm2clip_fast.train stage2 --init-model DST``. ``DST/conversion.json`` records
the source.

Expected failures print one line ``llm2clip_fast.convert: error: ...`` on stderr and exit with:

  2  bad arguments or options
  3  a source file or folder that does not exist, or a file or folder that cannot be read or written
     (permissions, a read-only filesystem)
  4  --out already exists (pass --overwrite)
  5  the source does not match the --from format (unknown/missing keys, shape mismatches), or a
     safetensors file of it is damaged or truncated
  9  a package the conversion needs is missing or broken (timm for --from eva-clip)

``--debug`` or ``LLM2CLIP_DEBUG=1`` shows the traceback of expected failures too.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli_exit_codes import code_for, redacting_excepthook, run_command_line
from .errors import OutputExistsError, SourceMismatchError

FORMATS = ("llm2clip-hf", "eva-clip", "hf-clip", "open_clip")
EXPORT_FORMATS = ("open_clip",)
_NEW_STAGE2_MODEL = ("llm_dim", "embed_dim", "keep_projection", "adapter_blocks", "adapter_expansion", "loss",
                     "seed")
_OPEN_CLIP_ONLY = ("act", "heads")
_EVA_CLIP_ONLY = ("model", "model_config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm2clip_fast.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source_format", choices=FORMATS,
                           help="import: what SRC is")
    direction.add_argument("--to", dest="target_format", choices=EXPORT_FORMATS,
                           help="export: the format to write SRC (an LLM2CLIPModel folder) in")
    parser.add_argument("source", metavar="SRC",
                        help="the source folder (or, for --from open_clip, file; for --from eva-clip, file)")
    parser.add_argument("--out", required=True,
                        help="the LLM2CLIPModel folder to write (--to open_clip: the .safetensors file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="cast every floating tensor (default: keep the source's dtype)")
    parser.add_argument("--llm", default=None,
                        help="record the LLM whose embeddings the adapter reads (config.llm.path, used by "
                             "eval), e.g. the folder of microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned; "
                             "where it is on this machine its files' hashes are recorded too, and eval "
                             "checks the LLM against them")
    from ..models.prompt_templates import TEMPLATE_CHOICES

    enc = parser.add_argument_group("with --llm: how eval encodes captions with it (recorded in config.llm)")
    enc.add_argument("--max-length", type=int, default=None,
                     help="token limit (default: LLM2CLIP's 512 for an LLM2CLIP model, else the LLM's saved "
                          "setting or 512)")
    enc.add_argument("--doc-max-length", type=int, default=None,
                     help="llm2vec's caption cap (default: LLM2CLIP's 512 for an LLM2CLIP model, whose "
                          "adapter was trained on embeddings extracted with it; else the LLM's saved setting "
                          "or 400)")
    enc.add_argument("--template", choices=TEMPLATE_CHOICES, default=None,
                     help="prompt template (default: 'llm2clip' for an LLM2CLIP model, the rule its "
                          "extraction followed; else the LLM's saved setting or 'auto')")
    parser.add_argument("--input-norm", choices=("l2", "none"), default=None,
                        help="the adapter's input normalisation (default 'l2', as the official TextProj "
                             "trains on cached embeddings; for llm2clip-hf an assumption, since the "
                             "release's modeling file could not be read: said at conversion and eval)")
    parser.add_argument("--logit-scale-init", choices=("pretrained", "new"), default=None,
                        help="a pretrained start (hf-clip, open_clip, a plain EVA-CLIP file): 'pretrained' "
                             "(default) keeps the source's logit_scale, as the official LLM2CLIP run keeps "
                             "its starting checkpoint's (CLIP-trained towers sit near ln 100); 'new' "
                             "restarts it at ln(1/0.07). A source without one starts new either way (said "
                             "in the output)")
    eva = parser.add_argument_group("--from eva-clip only")
    eva.add_argument("--model", default=None,
                     help="the official model config the state dict was trained with: EVA02-CLIP-B-16, "
                          "EVA02-CLIP-L-14 or EVA02-CLIP-L-14-336 (heads and MLP ratio are in no tensor "
                          "shape)")
    eva.add_argument("--model-config", default=None, metavar="JSON",
                     help="an official-format model config (embed_dim, vision_cfg) instead of --model")
    hf = parser.add_argument_group("--from hf-clip, --from open_clip and a plain EVA-CLIP file only")
    hf.add_argument("--llm-dim", type=int, default=None, help="size of the LLM embeddings the adapter reads")
    hf.add_argument("--embed-dim", type=int, default=None,
                    help="shared embedding size (default with --keep-projection: the projection's)")
    hf.add_argument("--keep-projection", action="store_true", default=None,
                    help="keep the pretrained visual projection (its output size must equal --embed-dim)")
    hf.add_argument("--adapter-blocks", type=int, default=None, help="adapter residual blocks (default 4)")
    hf.add_argument("--adapter-expansion", type=int, default=None, help="adapter MLP expansion (default 2)")
    hf.add_argument("--loss", choices=("clip", "siglip"), default=None, help="default clip")
    hf.add_argument("--seed", type=int, default=None, help="seed of the new parameters (default 0)")
    oc = parser.add_argument_group("--from open_clip only")
    oc.add_argument("--act", choices=("quick_gelu", "gelu"), default=None,
                    help="the tower's activation, needed for a bare state dict: quick_gelu for "
                         "OpenAI-pretrained weights and *-quickgelu models, gelu for other OpenCLIP models "
                         "(a folder's open_clip_config.json says it)")
    oc.add_argument("--heads", type=int, default=None,
                    help="attention heads, needed for a bare state dict (OpenCLIP: width // head_width, "
                         "head_width 64 unless the model config says otherwise)")
    return parser


def _refuse(args: argparse.Namespace, names: tuple[str, ...], why: str) -> None:
    given = sorted("--" + name.replace("_", "-") for name in names if getattr(args, name) is not None)
    if given:
        raise ValueError(f"{', '.join(given)} {why}")


def main(argv: list[str] | None = None) -> int:
    """Run one conversion; raises the expected failures (see the module docstring) instead of exiting."""
    from .assemble import DTYPES
    from .output_folder import check_output, write_model_folder

    args = build_parser().parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    logit_scale_init = args.logit_scale_init or "pretrained"
    if args.target_format is not None:
        return _export(args, dtype)
    check_output(args.out, args.overwrite)
    if args.source_format != "open_clip":
        _refuse(args, _OPEN_CLIP_ONLY, "only apply to --from open_clip (the source's config says them)")
    if args.source_format != "eva-clip":
        _refuse(args, _EVA_CLIP_ONLY, "only apply to --from eva-clip")
    if args.source_format == "eva-clip":
        from .eva_clip import convert_eva_clip

        # only a plain EVA-CLIP file (no adapter) takes these; an LLM2CLIP state dict refuses them
        new_parts = {name: getattr(args, name) for name in (*_NEW_STAGE2_MODEL, "logit_scale_init")
                     if getattr(args, name) is not None}
        model, provenance = convert_eva_clip(args.source, model=args.model, model_config=args.model_config,
                                             input_norm=args.input_norm or "l2", dtype=dtype,
                                             new_parts=new_parts)
    elif args.source_format == "llm2clip-hf":
        _refuse(args, (*_NEW_STAGE2_MODEL, "logit_scale_init"),
                "only apply to --from hf-clip / open_clip (an LLM2CLIP release brings its own adapter, "
                "projection, sizes and trained logit scale)")
        from .llm2clip_hf import convert_llm2clip_hf

        model, provenance = convert_llm2clip_hf(args.source, input_norm=args.input_norm, dtype=dtype)
    else:
        if args.llm_dim is None:
            raise ValueError(f"--from {args.source_format} needs --llm-dim (the size of the LLM embeddings "
                             "the new adapter reads)")
        common = dict(llm_dim=args.llm_dim, embed_dim=args.embed_dim,
                      keep_projection=bool(args.keep_projection), num_blocks=_default(args.adapter_blocks, 4),
                      expansion=_default(args.adapter_expansion, 2), loss=args.loss or "clip",
                      seed=_default(args.seed, 0), dtype=dtype, input_norm=args.input_norm or "l2")
        if args.source_format == "hf-clip":
            from .hf_clip import convert_hf_clip

            model, provenance = convert_hf_clip(args.source, **common, logit_scale_init=logit_scale_init)
        else:
            from .open_clip_import import convert_open_clip

            model, provenance = convert_open_clip(args.source, act=args.act, heads=args.heads, **common,
                                                  logit_scale_init=logit_scale_init)
    encoding = {k: getattr(args, k) for k in ("max_length", "doc_max_length", "template")
                if getattr(args, k) is not None}
    if encoding and args.llm is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in encoding)
        raise ValueError(f"{flags} describe how eval encodes captions with the LLM: they need --llm")
    for name in ("max_length", "doc_max_length"):
        if name in encoding and encoding[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {encoding[name]}")
    if args.llm is not None:
        trained_on_llm2clip = provenance.get("from") == "llm2clip-hf" or (
            provenance.get("from") == "eva-clip" and "kind" not in provenance)
        from ..models.prompt_templates import LLM2CLIP_ENCODING

        defaults = dict(LLM2CLIP_ENCODING) if trained_on_llm2clip else {}
        model.config.llm = {**recorded_llm(args.llm), **defaults, **encoding}
    out = write_model_folder(model, args.out, provenance, overwrite=args.overwrite)
    if "logit_scale" in provenance:
        print(provenance["logit_scale"])
    if str(provenance.get("adapter_input_norm_from", "")).startswith("default"):
        from .input_norm_notice import assumed_input_norm_notice

        print(f"NOTE: {assumed_input_norm_notice(out, provenance['adapter_input_norm'])}", file=sys.stderr)
    cfg = model.config
    print(f"wrote {out}: {cfg.vision['kind']} vision tower ({model.vision.num_layers} layers, "
          f"{model.image_size}px), adapter {cfg.llm_dim} -> {cfg.embed_dim} "
          f"({cfg.adapter['num_blocks']} blocks, input_norm {cfg.adapter.get('input_norm', 'l2')}), "
          f"{len(provenance['dropped'])} source tensors dropped")
    return 0


def recorded_llm(llm: str) -> dict[str, Any]:
    """``config.llm`` for ``--llm``: its path, and where it is a local folder (or in the local HF cache)
    the hashes of its files, which eval checks the LLM against before embedding captions."""
    from ..models.llm_fingerprint import RECORD_KEY, llm_weights_fingerprint

    record: dict[str, Any] = {"path": llm}
    try:
        record[RECORD_KEY] = llm_weights_fingerprint(llm)
    except FileNotFoundError:
        pass  # not on this machine: eval warns that it cannot check the LLM
    return record


def _export(args: argparse.Namespace, dtype) -> int:
    """``--to open_clip``: write the OpenCLIP files of the model folder SRC."""
    _refuse(args, (*_NEW_STAGE2_MODEL, *_OPEN_CLIP_ONLY, *_EVA_CLIP_ONLY, "llm", "input_norm",
                   "logit_scale_init", "max_length", "doc_max_length", "template"),
            f"only apply to imports (--from); --to {args.target_format} writes the model's vision side as "
            "it is")
    from .open_clip_export import export_open_clip

    weights, config = export_open_clip(args.source, args.out, overwrite=args.overwrite, dtype=dtype)
    print(f"wrote {weights} and {config.name} beside it (OpenCLIP vision side: visual.*, logit_scale)")
    return 0


def _default(value, default):
    return default if value is None else value


def exit_code_for(exc: BaseException) -> int | None:
    """The documented exit code of an expected failure, None for a bug."""
    from ..missing_dependency import MissingDependencyError
    from ..safetensors_files import DamagedWeightsError

    return code_for(exc, [
        (KeyboardInterrupt, 130),
        (MissingDependencyError, 9),
        (OutputExistsError, 4),
        ((SourceMismatchError, DamagedWeightsError), 5),
        ((FileNotFoundError, NotADirectoryError, PermissionError), 3),
        (ValueError, 2),
    ])


def cli(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with expected failures turned into one message and an exit code."""
    return run_command_line(main, argv, "llm2clip_fast.convert", exit_code_for)


if __name__ == "__main__":
    sys.excepthook = redacting_excepthook  # a bug's traceback must not print a credential either
    sys.exit(cli())
