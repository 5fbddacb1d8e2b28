"""Wan's text conditioning rule (WAN_SPEC §2.3) and the umT5 prompt encoder used to build datasets.

The rule: clean the prompt, tokenize with EOS to at most text_len tokens, run the encoder with the attention mask,
keep the first `true length` rows (EOS included) and zero-pad back to text_len. The DiT attends to all text_len
rows unmasked, so the padding must be exact zeros. Shards store the unpadded rows; `pad_context` restores the rest.
"""
from __future__ import annotations

import html
import re

import torch

WAN_TEXT_LEN = 512
# The negative prompt for CFG and condition dropout. Default: the English text the paper prints in Table 8, which
# the authors' NVlabs/FastGen also uses for Wan (fastgen/datasets/wds_dataloaders.py, PRESET_CONSTANTS
# "neg_prompt_wan"; scripts/inference/prompts/negative_prompt.txt). Option "zh": Wan2.1's Chinese original
# (wan/configs/shared_config.py), of which Table 8 is the translation; our default before issue 14.
PAPER_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
NEGATIVE_PROMPTS = {"en": PAPER_NEGATIVE_PROMPT, "zh": WAN_NEGATIVE_PROMPT}


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy (when installed), HTML unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def pad_context(context_L_C: torch.Tensor, text_len: int) -> torch.Tensor:
    """Zero-pad the true-length rows [L, C] to [text_len, C]; longer inputs are refused (Wan truncates at
    tokenization, never afterwards)."""
    n = context_L_C.shape[0]
    if n > text_len:
        raise ValueError(f"context has {n} rows, more than text_len={text_len}: tokenize with max_length={text_len}")
    out = context_L_C.new_zeros(text_len, context_L_C.shape[1])
    out[:n] = context_L_C
    return out


class PromptEncoder:
    """umT5 (or any T5-style encoder) + tokenizer -> per-prompt true-length embeddings [L_i, C], Wan's rule."""

    def __init__(self, tokenizer, text_encoder, text_len: int = WAN_TEXT_LEN, device="cpu",
                 dtype: torch.dtype = torch.float32):
        self.tokenizer, self.encoder = tokenizer, text_encoder.to(device).eval()
        self.text_len, self.device, self.dtype = text_len, torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, encoder_dir, tokenizer_dir=None, **kwargs) -> "PromptEncoder":
        from pathlib import Path

        from transformers import AutoTokenizer, UMT5EncoderModel

        for what, folder in (("text encoder", encoder_dir), ("tokenizer", tokenizer_dir or encoder_dir)):
            if not Path(folder).is_dir():  # transformers would take the name for a hub repository
                raise ValueError(f"{what} folder {folder} does not exist: give the local folder of Wan's umT5 "
                                 "(UMT5EncoderModel and its tokenizer; nothing is downloaded)")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or encoder_dir), local_files_only=True)
        encoder = UMT5EncoderModel.from_pretrained(str(encoder_dir), local_files_only=True)
        return cls(tokenizer, encoder, **kwargs)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> list[torch.Tensor]:
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n].to("cpu", self.dtype) for h, n in zip(hidden, lengths)]


def load_negative_embedding(path, text_dim: int, text_len: int) -> torch.Tensor:
    """The negative-prompt embedding [L, text_dim] (L <= text_len) a real recipe's data.negative names, as written by
    `tmd-preprocess negative`. Read with torch.load(weights_only=True): a file holding anything but tensors is
    refused, never executed. Raises ValueError naming the problem and the fix."""
    import pickle
    from pathlib import Path

    path = Path(path)
    fix = "write it with `tmd-preprocess negative <umT5 dir> <file>` and set data.negative to that file"
    if not path.is_file():
        raise ValueError(f"data.negative={path} does not exist: {fix}")
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"data.negative={path} is not a tensor file that torch.load(weights_only=True) accepts "
                         f"({first}): {fix}") from None
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
        got = f"a {tuple(t.shape)} {t.dtype} tensor" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
        raise ValueError(f"data.negative={path} holds {got}; expected float rows [L, {text_dim}]: {fix}")
    if t.shape[1] != text_dim or not 1 <= t.shape[0] <= text_len:
        raise ValueError(f"data.negative={path} is [{t.shape[0]}, {t.shape[1]}], the model takes [<= {text_len}, "
                         f"{text_dim}] (text_len, text_dim): it was encoded for another model; {fix}")
    if not torch.isfinite(t).all():
        raise ValueError(f"data.negative={path} has NaN/Inf values: {fix}")
    return t.float()
