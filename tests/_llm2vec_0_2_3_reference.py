# ruff: noqa: UP006, UP007, UP035, UP045, RUF005  (kept as llm2vec 0.2.3 writes it)
"""A transcription of llm2vec 0.2.3's encoding path, the reference ``LLMTextEncoder`` is tested against.

Source: the PyPI sdist ``llm2vec-0.2.3.tar.gz``, file ``llm2vec/llm2vec.py``, class ``LLM2Vec``:
``prepare_for_tokenization``, ``tokenize``, ``_skip_instruction``, ``forward``, ``get_pooling``
(``"mean"`` and ``"last_token"``), ``_convert_to_str``, ``encode`` (the single-device branch),
``_encode``, ``_text_length``; and ``batch_to_device``. The bodies are copied statement for
statement; only progress bars (``trange``), the multi-GPU branch, and loading/saving are left out.

llm2vec's bidirectional models (``llm2vec/models/bidirectional_llama.py``: ``LlamaBiModel``, and the
Mistral/Qwen2/Gemma ones built the same way) need transformers 4.43-4.44 internals. What they change
is ``_update_causal_mask``: the causal triangle is commented out, so the 4D additive mask is zero
except ``finfo.min`` on padded keys; position ids stay ``cache_position`` = ``arange(L)``.
:class:`BiModelReference` builds exactly that mask and those position ids and hands them to an
ordinary transformers 5 base model (a 4D mask is used as given, so its own causal masking never
applies); it does not go through ``llm2clip_fast.models.bidirectional``.

llm2vec itself is not importable here (it imports ``LlamaFlashAttention2``/``LlamaSdpaAttention``,
removed in transformers 5), hence the transcription.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torch import Tensor, device, nn


def batch_to_device(batch, target_device: device):
    for key in batch:
        if isinstance(batch[key], Tensor):
            batch[key] = batch[key].to(target_device)
    return batch


class BiModelReference(nn.Module):
    """``LlamaBiModel``'s forward on a transformers 5 base model: padding-only 4D mask, arange positions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor):
        dtype = self.model.get_input_embeddings().weight.dtype
        min_dtype = torch.finfo(dtype).min
        bsz, sequence_length = input_ids.shape
        target_length = attention_mask.shape[-1]
        cache_position = torch.arange(sequence_length, device=input_ids.device)
        # LlamaBiModel._update_causal_mask (llm2vec 0.2.3), 2D attention_mask branch:
        causal_mask = torch.zeros((sequence_length, target_length), dtype=dtype, device=input_ids.device)
        causal_mask *= torch.arange(target_length, device=input_ids.device) > cache_position.reshape(-1, 1)
        causal_mask = causal_mask[None, None, :, :].expand(bsz, 1, -1, -1)
        causal_mask = causal_mask.clone()
        mask_length = attention_mask.shape[-1]
        padding_mask = causal_mask[..., :mask_length].eq(0.0) * attention_mask[:, None, None, :].eq(0.0)
        causal_mask[..., :mask_length] = causal_mask[..., :mask_length].masked_fill(padding_mask, min_dtype)
        return self.model(input_ids=input_ids, attention_mask=causal_mask,
                          position_ids=cache_position.unsqueeze(0))


class LLM2VecReference(nn.Module):
    """``llm2vec.LLM2Vec`` 0.2.3 (encoding path only); ``model`` is a :class:`BiModelReference`."""

    def __init__(self, model, tokenizer, pooling_mode: str = "mean", max_length: int = 512,
                 doc_max_length: int = 400, skip_instruction: bool = True):
        super().__init__()
        self.model = model
        # LLM2Vec.from_pretrained: pad with EOS, on the left (get_pooling asserts the side).
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.skip_instruction = skip_instruction
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.config = model.config

    def prepare_for_tokenization(self, text):
        if self.model.config._name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct":
            text = "<|start_header_id|>user<|end_header_id|>\n\n" + text.strip() + "<|eot_id|>"
            return text
        if self.model.config._name_or_path in [
            "mistralai/Mistral-7B-Instruct-v0.2",
            "meta-llama/Llama-2-7b-chat-hf",
        ]:
            text = "[INST] " + text.strip() + " [/INST]"
        if self.model.config._name_or_path in ["google/gemma-2-9b-it"]:
            text = "<bos><start_of_turn>user\n" + text.strip() + "<end_of_turn>"
        if self.model.config._name_or_path in ["Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct"]:
            text = "<|im_start|>user\n" + text.strip() + "<|im_end|>"
        # (the pooling_mode == "eos_token" suffixes are not transcribed: mean/last_token only)
        return text

    def tokenize(self, texts):
        texts_2 = []
        original_texts = []
        for text in texts:
            t = text.split("!@#$%^&*()")
            texts_2.append(t[1] if len(t) > 1 else "")
            original_texts.append("".join(t))

        original = self.tokenizer(original_texts, return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.max_length)
        embed_mask = None
        for t_i, t in enumerate(texts_2):
            ids = self.tokenizer([t], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False)
            if embed_mask is None:
                e_m = torch.zeros_like(original["attention_mask"][t_i])
                if len(ids["input_ids"][0]) > 0:
                    e_m[-len(ids["input_ids"][0]):] = torch.ones(len(ids["input_ids"][0]))
                embed_mask = e_m.unsqueeze(0)
            else:
                e_m = torch.zeros_like(original["attention_mask"][t_i])
                if len(ids["input_ids"][0]) > 0:
                    e_m[-len(ids["input_ids"][0]):] = torch.ones(len(ids["input_ids"][0]))
                embed_mask = torch.cat((embed_mask, e_m.unsqueeze(0)), dim=0)

        original["embed_mask"] = embed_mask
        return original

    def _skip_instruction(self, sentence_feature):
        assert sentence_feature["attention_mask"].shape == sentence_feature["embed_mask"].shape
        sentence_feature["attention_mask"] = sentence_feature["embed_mask"]

    def forward(self, sentence_feature: Dict[str, Tensor]):
        embed_mask = None
        if "embed_mask" in sentence_feature:
            embed_mask = sentence_feature.pop("embed_mask")
        reps = self.model(**sentence_feature)
        sentence_feature["embed_mask"] = embed_mask
        return self.get_pooling(sentence_feature, reps.last_hidden_state)

    def get_pooling(self, features, last_hidden_states):  # All models padded from left
        assert self.tokenizer.padding_side == "left", "Pooling modes are implemented for padding from left."
        if self.skip_instruction:
            self._skip_instruction(features)
        seq_lengths = features["attention_mask"].sum(dim=-1)
        if self.pooling_mode == "mean":
            return torch.stack(
                [last_hidden_states[i, -length:, :].mean(dim=0) for i, length in enumerate(seq_lengths)],
                dim=0,
            )
        elif self.pooling_mode == "eos_token" or self.pooling_mode == "last_token":
            return last_hidden_states[:, -1]
        else:
            raise ValueError(f"{self.pooling_mode} is not implemented yet.")

    def _convert_to_str(self, instruction, text):
        tokenized_q = self.tokenizer(text, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False)
        tokenized_q_length = len(tokenized_q["input_ids"][0])

        while tokenized_q_length > self.doc_max_length:
            reduction_ratio = self.doc_max_length / tokenized_q_length
            reduced_length = int(len(text.split()) * reduction_ratio)
            text = " ".join(text.split()[:reduced_length])
            tokenized_q = self.tokenizer(text, return_tensors="pt", padding=True, truncation=True,
                                         max_length=self.max_length, add_special_tokens=False)
            tokenized_q_length = len(tokenized_q["input_ids"][0])

        return f"{instruction.strip()} !@#$%^&*(){text}" if instruction else f"!@#$%^&*(){text}"

    def encode(self, sentences: Union[str, List[str]], batch_size: int = 32,
               convert_to_numpy: bool = False, convert_to_tensor: bool = False,
               device: Optional[str] = None):
        if isinstance(sentences[0], str) and isinstance(sentences[-1], int):
            sentences = [sentences]
        # required for MEDI version of MTEB
        if isinstance(sentences[0], str):
            sentences = [[""] + [sentence] for sentence in sentences]

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"

        concatenated_input_texts = []
        for sentence in sentences:
            assert isinstance(sentence[0], str)
            assert isinstance(sentence[1], str)
            concatenated_input_texts.append(self._convert_to_str(sentence[0], sentence[1]))
        sentences = concatenated_input_texts

        self.eval()

        if convert_to_tensor:
            convert_to_numpy = False

        length_sorted_idx = np.argsort([-self._text_length(sen) for sen in sentences])
        sentences_sorted = [sentences[idx] for idx in length_sorted_idx]
        all_embeddings = []

        self.to(device)
        for start_index in range(0, len(sentences), batch_size):
            sentences_batch = sentences_sorted[start_index:start_index + batch_size]
            embeddings = self._encode(sentences_batch, device=device, convert_to_numpy=convert_to_numpy)
            all_embeddings.append(embeddings)

        all_embeddings = torch.cat(all_embeddings, dim=0)
        all_embeddings = all_embeddings[np.argsort(length_sorted_idx)]
        all_embeddings = all_embeddings.to(torch.float32)
        if convert_to_numpy:
            all_embeddings = np.asarray([emb.numpy() for emb in all_embeddings])
        return all_embeddings

    def _encode(self, sentences_batch, device: Optional[str] = None, convert_to_numpy: bool = False,
                multiprocessing=False):
        self.to(device)
        features = self.tokenize([self.prepare_for_tokenization(sentence) for sentence in sentences_batch])
        features = batch_to_device(features, device)

        with torch.no_grad():
            embeddings = self.forward(features)
            embeddings = embeddings.detach()
            embeddings = embeddings.cpu()

        return embeddings

    def _text_length(self, text):
        if isinstance(text, str) or (isinstance(text, list) and isinstance(text[0], int)) or len(text) == 0:
            return len(text)
        if isinstance(text, dict):
            return len(next(iter(text.values())))
        elif not hasattr(text, "__len__"):
            return 1
        else:
            return sum([len(t) for t in text])


# llm2vec/loss/loss_utils.py: cos_sim; llm2vec/loss/HardNegativeNLLLoss.py: HardNegativeNLLLoss
# (the single-process path: torch.distributed not initialised).
def cos_sim(a: Tensor, b: Tensor):
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a)
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(b)
    if len(a.shape) == 1:
        a = a.unsqueeze(0)
    if len(b.shape) == 1:
        b = b.unsqueeze(0)
    a_norm = torch.nn.functional.normalize(a, p=2, dim=1)
    b_norm = torch.nn.functional.normalize(b, p=2, dim=1)
    return torch.mm(a_norm, b_norm.transpose(0, 1))


class HardNegativeNLLLoss:
    def __init__(self, scale: float = 20.0, similarity_fct=cos_sim):
        self.scale = scale
        self.similarity_fct = similarity_fct
        self.cross_entropy_loss = nn.CrossEntropyLoss()

    def __call__(self, q_reps: Tensor, d_reps_pos: Tensor, d_reps_neg: Tensor = None):
        if d_reps_neg is None:
            d_reps_neg = d_reps_pos[:0, :]
        full_d_reps_pos = d_reps_pos
        full_q_reps = q_reps
        full_d_reps_neg = d_reps_neg
        d_reps = torch.cat([full_d_reps_pos, full_d_reps_neg], dim=0)
        scores = self.similarity_fct(full_q_reps, d_reps) * self.scale
        labels = torch.tensor(range(len(scores)), dtype=torch.long, device=scores.device)
        loss = self.cross_entropy_loss(scores, labels)
        return loss
