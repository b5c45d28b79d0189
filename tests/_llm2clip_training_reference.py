# ruff: noqa: E501, UP004, UP031, NPY002  (the official code as written)
"""Transcriptions of microsoft/LLM2CLIP's stage-2 training code, what our recipe is tested against.

Source: github microsoft/LLM2CLIP at commit cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a. Each function
names its file; the bodies are copied statement for statement, with these changes only:

- ``load_checkpoint`` (``llm2clip/eva_clip/factory.py``) takes the loaded state dict instead of a path,
  skips the position-embedding resizing (a no-op when the sizes agree, as in every test here) and returns
  the state dict it would pass to ``model.load_state_dict(strict=False)``; ``os.getenv('RoPE')`` is the
  ``rope`` argument (``create_model`` sets it from ``vision_cfg['rope']``).
- ``EVAVisionTransformer`` (``llm2clip/eva_clip/eva_vit_model.py``): only the initialisation of the
  ``head`` is transcribed (``_init_weights`` on it, then the head's own re-initialisation), as
  :func:`init_head` on a given ``nn.Linear``; timm's ``trunc_normal_`` is torch's (same arguments,
  absolute bounds a=-2, b=2).
- ``get_default_params`` (``llm2clip/training/params.py``), ``get_num_layer_for_transformer``,
  ``LayerDecayValueAssigner`` and ``get_assigner`` (``llm2clip/training/optim.py``; ``model`` is whatever
  answers ``visual.get_num_layers()``/``text.get_num_layers()``), ``warmup_cosine_lr``
  (``llm2clip/training/scheduler.py``, over a list of param-group dicts).
- ``MixingDataLoader.__iter__``'s dataset choice (``llm2clip/training/data.py``) as
  :func:`mixing_dataset_index`, and ``get_wds_dataset``'s ``get_text`` (the same file).
- ``RUN_SH``: the options ``llm2clip/run.sh`` passes, as parsed.
"""

from __future__ import annotations

import logging
import re

import numpy as np
from torch import nn
from torch.nn.init import trunc_normal_

# llm2clip/run.sh (MODEL=EVA02-CLIP-L-14-336, PRETRAINED=eva_clip), the training options it passes.
RUN_SH = {
    "name": "T_vitl336_Rcc12mR_Rcc3m_4ep", "model": "EVA02-CLIP-L-14-336", "pretrained": "eva_clip",
    "train_data_list": "data/cc3m/{00..00287}.tar;data/cc12m/{00..01001}.tar",
    "train_num_samples_list": [2873538, 10000225], "dataset_resampled": True, "precision": "fp16",
    "warmup": 0, "batch_size": 512, "epochs": 20, "lr": 1e-5, "visual_lr": 1e-5, "text_lr": 1e-5,
    "wd": 0.05, "visual_wd": 0.05, "text_wd": 0.05, "ld": 1.0, "text_ld": 1.01, "visual_ld": 0.85,
    "grad_clip_norm": 5.0, "smoothing": 0.0, "seed": 4096, "optimizer": "ap_adamw", "zero_stage": 1,
    "nproc_per_node": 8,
}
# llm2clip/eva_clip/model_configs/*.json at the same commit: the model names --model may take.
OFFICIAL_MODEL_CONFIGS = (
    "EVA01-CLIP-B-16", "EVA01-CLIP-g-14-plus", "EVA01-CLIP-g-14", "EVA02-CLIP-B-16", "EVA02-CLIP-L-14-336",
    "EVA02-CLIP-L-14", "EVA02-CLIP-bigE-14-plus", "EVA02-CLIP-bigE-14", "Llama3.1-8B-Siglip2-So-L-14-224",
    "Llama3.2-1B-EVA02-L-14-336", "OpenaiCLIP-B-16", "OpenaiCLIP-L-14-336", "OpenaiCLIP-L-14",
)


# -- llm2clip/eva_clip/factory.py ---------------------------------------------------------------------

def load_checkpoint(model_has_logit_scale, state_dict, rope=True):
    # detect old format and make compatible with new format  (convert_to_custom_text_state_dict: not
    # reached for the EVA-CLIP layouts tested here, which have no top-level positional_embedding)
    if 'text.logit_scale' in state_dict and model_has_logit_scale:
        state_dict['logit_scale'] = state_dict['text.logit_scale']
        del state_dict['text.logit_scale']

    # (load_state_dict's RoPE step, with os.getenv('RoPE') == '1' as `rope`)
    if rope:
        for k in list(state_dict.keys()):
            if 'freqs_cos' in k or 'freqs_sin' in k:
                del state_dict[k]

    # specified to train with LLM features
    for k in list(state_dict.keys()):
        if 'text' in k:
            del state_dict[k]
        if 'visual.head'in k:
            del state_dict[k]

    # modify model
    for k in list(state_dict.keys()):
        if 'visual' in k and 'q_bias'in k:
            state_dict[k.replace('q_bias','q_proj.bias')] = state_dict[k]
        if 'visual' in k and 'v_bias'in k:
            state_dict[k.replace('v_bias','v_proj.bias')] = state_dict[k]
    return state_dict


# -- llm2clip/eva_clip/eva_vit_model.py (EVAVisionTransformer.__init__, the head) ------------------------

def init_head(head: nn.Linear, init_scale=0.001):
    # self.apply(self._init_weights) reaches the head too:
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=.02)
        if head.bias is not None:
            nn.init.constant_(head.bias, 0)
    # then, after fix_init_weight (which touches the blocks only):
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=.02)
        head.weight.data.mul_(init_scale)
        head.bias.data.mul_(init_scale)


# -- llm2clip/training/params.py ------------------------------------------------------------------------

def get_default_params(model_name):
    # Params from paper (https://arxiv.org/pdf/2103.00020.pdf)
    model_name = model_name.lower()
    if "vit" in model_name:
        return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    else:
        return {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


# -- llm2clip/training/optim.py -------------------------------------------------------------------------

def get_num_layer_for_transformer(param_name, num_max_layer):
    layer_0 = {
        "patch_embed",
        "pos_embed",
        "cls_token",
        "mask_token",
        "conv1",
        "positional_embedding",
        "token_embedding",
        "transformer.embeddings.word_embeddings",
        "transformer.embeddings.position_embeddings",
        "transformer.embeddings.token_type_embeddings",
    }

    if any(l in param_name for l in layer_0):
        return 0

    block_regex = re.compile(r"blocks\.([0-9]+)\.")
    match_block = block_regex.search(param_name)

    #huggingface->text.transformer.encoder.layer
    layer_regex = re.compile(r"layer\.([0-9]+)\.")
    match_layer = layer_regex.search(param_name)
    if match_block is not None:
        return int(match_block.group(1)) + 1
    elif match_layer is not None:
        return int(match_layer.group(1)) + 1
    else:
        return num_max_layer - 1


class LayerDecayValueAssigner(object):
    def __init__(self, values):
        self.values = values

    def get_scale(self, layer_id):
        return self.values[layer_id]

    def get_layer_id(self, var_name):
        return get_num_layer_for_transformer(var_name, len(self.values))


def get_assigner(args, model):
    visual_ld = args.visual_ld if args.visual_ld else args.ld
    text_ld = args.text_ld if args.text_ld else args.ld

    if visual_ld < 1.0:
        visual_num_layers = model.visual.get_num_layers()
        assigner_visual = LayerDecayValueAssigner(list(visual_ld ** (visual_num_layers + 1 - i) for i in range(visual_num_layers + 2)))
    else:
        assigner_visual = None

    if text_ld < 1.0:
        text_num_layers = model.text.get_num_layers()
        assigner_text = LayerDecayValueAssigner(list(text_ld ** (text_num_layers + 1 - i) for i in range(text_num_layers + 2)))
    else:
        assigner_text = None

    if assigner_visual is not None:
        logging.info("Assigned visual values = %s" % str(assigner_visual.values))
    if assigner_text is not None:
        logging.info("Assigned text values = %s" % str(assigner_text.values))
    return assigner_visual, assigner_text


# -- llm2clip/training/scheduler.py ---------------------------------------------------------------------

def _warmup_lr(base_lr, warmup_length, step):
    return base_lr * (step + 1) / warmup_length


def warmup_cosine_lr(param_groups, args, steps):
    def _lr_adjuster(step):
        for param_group in param_groups:
            if param_group['group'] == 'text':
                base_lr = args.text_lr if args.text_lr is not None else args.lr
            elif param_group['group'] == 'visual':
                base_lr = args.visual_lr if args.visual_lr is not None else args.lr
            else:
                base_lr = args.lr

            if step < args.warmup:
                lr = _warmup_lr(base_lr, args.warmup, step)
            else:
                e = step - args.warmup
                es = steps - args.warmup
                lr = 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr
            scale = param_group.get("lr_scale", 1.0)
            param_group["lr"] = scale * lr
        return lr
    return _lr_adjuster


# -- llm2clip/training/data.py --------------------------------------------------------------------------

def mixing_dataset_index(count, num_batches, current_epoch, sample_weights, num_datasets):
    """MixingDataLoader.__iter__: which dataset the count-th batch of an epoch comes from."""
    # set random seed for sampling from the same dataset.
    # sample a dataset according to sample_weights
    if sample_weights is not None:
        stable_random_seed = int(count + num_batches * current_epoch)
        np.random.seed(stable_random_seed)
        iter_index = np.random.choice(range(num_datasets), p=sample_weights)
    else:
        iter_index = count % num_datasets
    return iter_index


def mixing_sample_weights(num_samples_list):
    """MixingDataLoader.__init__'s sample_weights from the datasets' num_samples."""
    num_samples = sum(num_samples_list)
    return np.array([float(n) / num_samples for n in num_samples_list])


_KEYS = ["shortsv_captions", "longsv_captions"]


def get_text(item, choice):
    """get_wds_dataset's get_text; `choice` stands for the module-level random.choice."""
    sample = {}
    sample['image'] = item['jpg']
    f1 = np.frombuffer(item[_KEYS[0]], dtype=np.float32)
    f2 = np.frombuffer(item[_KEYS[1]], dtype=np.float32)
    sample['text'] = choice([f1, f2])
    return sample




# -- llm_caption_contrastive/dataset/E5_cc3m.py (stage 1) -----------------------------------------------

E5_CC3M_PROMPTS = [
    "Given a sentence, retrieve a detailed relevant sentence",
    "Given a detailed sentence, retrieve a short relevant sentence",
]
SEPARATOR = "!@#$%^&*()"


def get_cc3m(data, random):
    """E5Data.get_cc3m over ``data`` (rows of [short_caption, long_caption], the csv's values); `random`
    stands for the module (the official code uses the global one)."""
    list_of_dict = []
    for i in range(len(data)):
        short_caption = data[i][0]
        long_caption = data[i][1]
        rand_num = random.randint(0, 1)
        if rand_num == 0:
            query = short_caption
            positive = long_caption
        else:
            query = long_caption
            positive = short_caption
        while True:
            rand_index = random.randint(0, len(data) - 1)
            if rand_index != i:
                neg = data[rand_index][1] if rand_num == 0 else data[rand_index][0]
                break
        list_of_dict.append({
            'query': query,
            'positive': positive,
            'negative': neg,
            'random_num': rand_num
        })
    return list_of_dict


def cc3m_texts(sample, separator=SEPARATOR):
    """E5Data.load_data's cc3m branch: the (query, positive, negative) texts of one sample."""
    instruction = (
        E5_CC3M_PROMPTS[sample["random_num"]]
    )
    query = f"{instruction}; " + separator + sample["query"]
    pos = separator + sample["positive"]
    neg = separator + sample["negative"]
    return query, pos, neg


# -- llm_caption_contrastive/run_supervised.py: prepare_for_tokenization, Llama-3-Instruct branch ----------

def prepare_for_tokenization_llama3(text):
    text = (
        "<|start_header_id|>user<|end_header_id|>\n\n" + text.strip() + "<|eot_id|>"
    )
    return text


def llm2vec_split(text, separator=SEPARATOR):
    """llm2vec 0.2.3 LLM2Vec.tokenize's split of one text: (what is tokenised, what is pooled)."""
    t = text.split(separator)
    return "".join(t), (t[1] if len(t) > 1 else "")


# -- llm2clip/llm2vec/llm2vec.py: LLM2CLIP's modified copy of llm2vec (prepare_for_tokenization) ---------------

def llm2clip_prepare_for_tokenization(name_or_path, text, pooling_mode="mean"):
    """LLM2Vec.prepare_for_tokenization of LLM2CLIP's copy, ``self.model.config._name_or_path`` as
    ``name_or_path`` (the eos_token suffixes, for pooling_mode "eos_token", are not transcribed)."""
    if "Llama-3" in name_or_path and "Instruct" in name_or_path:
        text = (
            "<|start_header_id|>user<|end_header_id|>\n\n"
            + text.strip()
            + "<|eot_id|>"
        )
        return text
    if name_or_path == "microsoft/Phi-3.5-mini-instruct":
        text = (
            '<|user|>\n'
            + text.strip()
            + '<|end|>\n'
        )
    if name_or_path in [
        "mistralai/Mistral-7B-Instruct-v0.2",
        "meta-llama/Llama-2-7b-chat-hf",
    ]:
        text = "[INST] " + text.strip() + " [/INST]"
    if name_or_path in [
        "google/gemma-2-9b-it",
    ]:
        text = "<bos><start_of_turn>user\n" + text.strip() + "<end_of_turn>"
    if name_or_path in [
        "Qwen/Qwen2-1.5B-Instruct",
        "Qwen/Qwen2-7B-Instruct",
    ]:
        text = "<|im_start|>user\n" + text.strip() + "<|im_end|>"
    return text


# -- llm2vec 0.2.3 llm2vec/llm2vec.py LLM2Vec.from_pretrained: which _name_or_path the model ends with ---------

def llm2vec_from_pretrained_name_or_path(base_model_name_or_path):
    """``model.config._name_or_path`` after ``LLM2Vec.from_pretrained(base_model_name_or_path)`` (0.2.3;
    LLM2CLIP's copy reads it the same way): transformers' from_pretrained sets it to the name as given,
    then for a local folder llm2vec replaces it with its config.json's (PretrainedConfig.from_dict keeps a
    ``_name_or_path`` key; without one the attribute is "")."""
    import json
    import os

    name = str(base_model_name_or_path)  # modeling_utils: config.name_or_path = pretrained_model_name_or_path
    if os.path.isdir(base_model_name_or_path) and os.path.exists(
        f"{base_model_name_or_path}/config.json"
    ):
        with open(f"{base_model_name_or_path}/config.json") as fIn:
            config_dict = json.load(fIn)
        name = config_dict.get("_name_or_path", "")  # PretrainedConfig.from_dict(config_dict)._name_or_path
    return name


# -- llm2clip/data/extract_embedding.py: save_embeddings_to_tar ------------------------------------------------

def save_embeddings_to_tar(path, keys, embeddings, _KEYS=("shortSV_captions", "longSV_captions")):
    """``embeddings``: {caption key: (N, dim) float32 torch tensor} as ``model.encode(..., convert_to_tensor=
    True)`` returns them."""
    import webdataset as wds

    try:
        with wds.TarWriter(path) as dst:
            for i, key in enumerate(keys):
                sample = {}
                sample["__key__"] = key
                for k in _KEYS:
                    feautre = embeddings[k][i].numpy().tobytes()
                    sample[k] = feautre
                dst.write(sample)
        print("saved: ", path)
    except:  # noqa: E722
        print("failed to save: ", path)
