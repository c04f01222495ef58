"""Frozen text encoders.

``UMT5TextEncoder``: Wan2.1's text encoder, the umt5-xxl encoder, run through transformers'
``UMT5EncoderModel``. It loads either Wan's own ``models_t5_umt5-xxl-enc-bf16.pth`` (renamed key by key,
docs/wan_architecture.md, 'T5 key map') or a Hugging Face folder (the ``text_encoder/`` of the ``-Diffusers``
repos). Prompts are cleaned like Wan does (docs/wan_architecture.md, 'Prompt cleaning'), tokenised to 512 tokens,
encoded with the padding mask, and rows past each prompt's true length are zeroed: the output is always ``[B, 512,
4096]``, which is what the DiT's cross-attention expects.

``ToyTextEncoder``: a deterministic, download-free stand-in for the built-in toy task.

Both are frozen: no gradients, and ``.train()`` is a no-op (Lightning calls it on the whole LightningModule;
the T5 config carries dropout 0.1 that must never switch on).
"""

from __future__ import annotations

import copy
import hashlib
import html
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

from sfplus.file_checks import DamagedFileError, open_safetensors, torch_load

__all__ = [
    "EncoderCheckpointError",
    "ToyTextEncoder",
    "UMT5TextEncoder",
    "clean_prompt",
    "hf_t5_to_wan",
    "load_tokenizer",
    "read_state_dict",
    "umt5_config_from_wan",
    "umt5_xxl_config",
    "wan_t5_to_hf",
]

WAN_TEXT_LEN = 512  # Wan2.1 text_len: tokens per prompt, and rows of the DiT's text context
UMT5_XXL_DIM = 4096


class EncoderCheckpointError(DamagedFileError):
    """A checkpoint is damaged or does not fit the encoder: missing, unexpected or mis-shaped keys (all listed)."""


# --------------------------------------------------------------------------------------------------------------
# Reading weights files
# --------------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """Read a flat state dict from a ``.pth``/``.pt``/``.bin`` (pickle-free) or ``.safetensors`` file, on CPU.

    Torch files are memory-mapped when possible, so keys dropped by ``keep`` (e.g. CLIP's text tower) are
    never read from disk. Never unpickles arbitrary objects (``weights_only=True``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        with open_safetensors(path, "encoder weights", EncoderCheckpointError) as f:
            try:
                return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
            except Exception as err:  # data shorter than the header says: the Rust side's own error type
                raise EncoderCheckpointError(f"encoder weights {path} are truncated or damaged ({err})") from None
    # Legacy (non-zip) files cannot be memory-mapped: torch_load reads those whole.
    sd = torch_load(path, "encoder weights", EncoderCheckpointError)
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise EncoderCheckpointError(f"{path}: expected a flat state dict of tensors, got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if keep is None or keep(k)}


def check_keys(
    given: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str, what: str
) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key of ``given`` vs ``expected``."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(given[k].shape)} != expected {tuple(expected[k].shape)}"
        for k in set(given) & set(expected)
        if given[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the {what}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise EncoderCheckpointError("\n  ".join(parts))


# --------------------------------------------------------------------------------------------------------------
# Wan T5 <-> HF UMT5 key map (docs/wan_architecture.md, 'T5 key map')
# --------------------------------------------------------------------------------------------------------------

# Per-block renames, Wan suffix -> HF suffix (both after the block index).
_T5_BLOCK_MAP = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_BLOCK_MAP_INV = {v: k for k, v in _T5_BLOCK_MAP.items()}
_WAN_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK_RE = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def wan_t5_to_hf(sd: Mapping[str, Tensor], *, source: str = "Wan T5 state dict") -> dict[str, Tensor]:
    """Rename a Wan ``T5Encoder`` state dict to ``UMT5EncoderModel`` keys (tensors are not copied).

    ``token_embedding.weight`` feeds both ``shared.weight`` and ``encoder.embed_tokens.weight`` (HF ties them).
    Keys this map does not know raise ``EncoderCheckpointError`` (all listed); a missing key is reported by
    the loader, which knows the expected set.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _WAN_BLOCK_RE.fullmatch(key)) and m.group(2) in _T5_BLOCK_MAP:
            out[f"encoder.block.{m.group(1)}.{_T5_BLOCK_MAP[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise EncoderCheckpointError(f"{source}: keys not in the Wan T5 layout ({len(unknown)}): {sorted(unknown)}")
    return out


def hf_t5_to_wan(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``wan_t5_to_hf``: ``UMT5EncoderModel`` keys to Wan's (the tied embedding appears once)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            out.setdefault("token_embedding.weight", value)
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif (m := _HF_BLOCK_RE.fullmatch(key)) and m.group(2) in _T5_BLOCK_MAP_INV:
            out[f"blocks.{m.group(1)}.{_T5_BLOCK_MAP_INV[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise EncoderCheckpointError(f"keys not in the HF UMT5 encoder layout ({len(unknown)}): {sorted(unknown)}")
    return out


def umt5_xxl_config():
    """``UMT5Config`` of Wan2.1's text encoder (umt5-xxl, encoder only; docs/wan_architecture.md, 'T5 text encoder')."""
    # local: transformers model classes load on first use; only the Wan text encoder needs them
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    )


def umt5_config_from_wan(sd: Mapping[str, Tensor], *, source: str = "Wan T5 state dict"):
    """Read a ``UMT5Config`` off the shapes of a Wan T5 state dict.

    Everything but the relative-position max distance (128), norm eps (1e-6) and the gated tanh-GELU FFN
    is visible in the shapes (the bias table is [buckets, heads]); those three are fixed in Wan's T5.
    For the real file this equals ``umt5_xxl_config()``.
    """
    # local: transformers model classes load on first use; only the Wan text encoder needs them
    from transformers import UMT5Config

    needed = [
        "token_embedding.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.pos_embedding.embedding.weight",
        "blocks.0.ffn.fc1.weight",
    ]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise EncoderCheckpointError(f"{source}: cannot read the T5 config, missing keys: {absent}")
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    inner = sd["blocks.0.attn.q.weight"].shape[0]
    if inner % heads:
        raise EncoderCheckpointError(f"{source}: attention width {inner} is not a multiple of {heads} heads")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _WAN_BLOCK_RE.fullmatch(k)))
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // heads),
        d_ff=int(sd["blocks.0.ffn.fc1.weight"].shape[0]),
        num_layers=layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    )


# --------------------------------------------------------------------------------------------------------------
# Prompt cleaning (docs/wan_architecture.md, 'Prompt cleaning') without ftfy
# --------------------------------------------------------------------------------------------------------------

# The parts of ``ftfy.fix_text`` (default config) that are plain character tables, reproduced so cleaning is
# the same on every machine without the dependency. Not reproduced: ftfy's mojibake repair (``fix_encoding``:
# e.g. "cafÃ©" -> "café", with its heuristics and codec tables) and surrogate fixing. For ordinary,
# correctly-decoded prompts (English, Chinese with full-width punctuation, curly quotes, HTML entities) the
# result equals Wan's ``whitespace_clean(basic_clean(text))``.
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_C1_RE = re.compile("[\x80-\x9f]")
_SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
_LIGATURES = str.maketrans(
    {
        "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
        "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
        "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
    }
)  # fmt: skip
# Full-width forms -> ASCII, half-width -> standard width, ideographic space -> space (e.g. "，" -> ",").
_WIDTH = {0x3000: " "} | {
    i: unicodedata.normalize("NFKC", chr(i))
    for i in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(i)) != chr(i)
}
_CONTROL = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)
_WHITESPACE_RE = re.compile(r"\s+")


def _c1_to_cp1252(match: re.Match) -> str:
    # C1 controls are almost always Windows-1252 bytes decoded as Latin-1 (what browsers assume too);
    # the five bytes cp1252 leaves undefined stay as they are.
    try:
        return match.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _fix_text_line(line: str) -> str:
    # ftfy leaves entities alone in text that looks like HTML markup, and repeats its fixes to a fixed point.
    unescape = "<" not in line
    while True:
        before = line
        if unescape:
            line = html.unescape(line)
        line = _C1_RE.sub(_c1_to_cp1252, line)
        line = line.translate(_LIGATURES).translate(_WIDTH)
        line = _SINGLE_QUOTE_RE.sub("'", _DOUBLE_QUOTE_RE.sub('"', line))
        line = _ANSI_RE.sub("", line).translate(_CONTROL)
        line = unicodedata.normalize("NFC", line)
        if line == before:
            return line


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'`` prompt cleaning, with ftfy's table-driven fixes done here.

    Steps: ftfy-like fixes per line (HTML entities, C1 controls, Latin ligatures, full-width characters,
    curly quotes, terminal escapes, control characters, NFC), then ``html.unescape`` twice, strip, collapse
    whitespace runs to one space, strip.
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
    text = "".join(_fix_text_line(line) for line in text.splitlines(keepends=True))
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RE.sub(" ", text).strip()


def _check_prompts(prompts) -> list[str]:
    # A bare string is a sequence too: encoding it would silently give one "prompt" per character.
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}: {prompts!r}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be a list of str; not str: {bad!r}")
    return list(prompts)


# --------------------------------------------------------------------------------------------------------------
# UMT5 encoder
# --------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer`` from a local folder in the google/umt5-xxl layout (spiece.model / tokenizer.json)."""
    # local: transformers' tokenizers load on first use; only the Wan text encoder needs them
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path} (expected the google/umt5-xxl files)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
        raise FileNotFoundError(
            f"cannot load a tokenizer from {path}: {e} (expected the google/umt5-xxl tokenizer files)"
        ) from e


def hf_dtype_kwarg(dtype: torch.dtype) -> dict:
    """The keyword that sets the dtype in transformers' ``from_pretrained`` (``dtype`` since 4.56, ``torch_dtype``
    before), as ``{name: dtype}``."""

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


class UMT5TextEncoder(nn.Module):
    """Frozen umt5-xxl encoder: prompts -> ``[B, max_len, dim]`` with rows past each prompt zeroed.

    Build with ``UMT5TextEncoder.load(weights, tokenizer)``; ``weights`` is Wan's
    ``models_t5_umt5-xxl-enc-bf16.pth`` or an HF folder holding a ``UMT5EncoderModel``.

    Args:
        model: a ``transformers.UMT5EncoderModel``.
        tokenizer: a tokenizer in the umt5 layout (pad id 0, EOS appended), or None to use only
            ``encode_tokens``.
        max_len: tokens per prompt (Wan: 512); prompts are padded and truncated to it.

    Attributes:
        dim: hidden size (4096 for umt5-xxl). max_len: rows of the output.
    """

    def __init__(self, model: nn.Module, tokenizer=None, max_len: int = WAN_TEXT_LEN):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = int(model.config.d_model)
        self.max_len = int(max_len)

    # -- construction ----------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        weights: str | os.PathLike,
        tokenizer: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_len: int = WAN_TEXT_LEN,
    ) -> UMT5TextEncoder:
        """Load from Wan's ``.pth`` (or a Wan-layout ``.safetensors``) or from an HF model folder.

        Wan's pipeline runs T5 in bf16 (the default here); Self-Forcing runs the same weights in fp32.
        """
        weights = Path(weights)
        if not weights.exists():
            raise FileNotFoundError(f"T5 weights not found: {weights} (expected Wan's .pth or an HF folder)")
        tok = load_tokenizer(tokenizer)
        if weights.is_dir():
            if not (weights / "config.json").is_file():
                raise FileNotFoundError(f"{weights} is a folder but has no config.json (expected an HF UMT5 model)")
            # local: loads transformers' modeling code (~120 ms); only the Wan text encoder needs it
            from transformers import UMT5EncoderModel

            model = UMT5EncoderModel.from_pretrained(str(weights), **hf_dtype_kwarg(dtype))
            return cls(model, tok, max_len).to(device)
        sd = read_state_dict(weights)
        return cls.from_wan_state_dict(sd, tok, dtype=dtype, device=device, max_len=max_len, source=str(weights))

    @classmethod
    def from_wan_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        tokenizer=None,
        config=None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_len: int = WAN_TEXT_LEN,
        source: str = "Wan T5 state dict",
    ) -> UMT5TextEncoder:
        """Build from a Wan-layout state dict. ``config`` defaults to the one read off the shapes.

        The model is created on the meta device and takes the given tensors as its parameters (no random
        init, no copy of a memory-mapped file until ``dtype``/``device`` ask for one).
        """
        # local: loads transformers' modeling code (~120 ms); only the Wan text encoder needs it
        from transformers import UMT5EncoderModel

        config = umt5_config_from_wan(sd, source=source) if config is None else copy.deepcopy(config)
        config.dropout_rate = 0.0
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        check_keys(sd, hf_t5_to_wan(model.state_dict()), source, f"UMT5 encoder ({config.num_layers} layers)")
        model.load_state_dict(wan_t5_to_hf(sd, source=source), strict=True, assign=True)
        # assign=True replaced the two tied embedding parameters one by one: tie them again so that a later
        # dtype/device move does not duplicate the 1 G-entry table.
        model.encoder.embed_tokens.weight = model.shared.weight
        return cls(model, tokenizer, max_len).to(device=device, dtype=dtype)

    # -- encoding --------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> UMT5TextEncoder:
        """Frozen: stays in eval mode whatever ``mode`` says (keeps dropout off under Lightning)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Clean and tokenise -> (input ids [B, max_len] long, attention mask [B, max_len] long), on CPU."""
        prompts = _check_prompts(prompts)
        if self.tokenizer is None:
            raise ValueError("UMT5TextEncoder was built without a tokenizer: pass one, or call encode_tokens")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.max_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()  # not inference_mode: the outputs feed training graphs, which must be able to save them
    def encode_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Encode token ids [B, L] with mask [B, L] -> float32 [B, L, dim]; rows >= mask.sum(1) are zero."""
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.gt(0).sum(dim=1)
        past_end = torch.arange(hidden.shape[1], device=hidden.device)[None, :] >= lengths[:, None]
        return hidden.float().masked_fill(past_end[..., None], 0.0)

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> float32 [B, max_len, dim] on the encoder's device, rows past each prompt zeroed."""
        return self.encode_tokens(*self.tokenize(prompts))

    def forward(self, prompts: list[str]) -> Tensor:
        return self.encode(prompts)


# --------------------------------------------------------------------------------------------------------------
# Toy encoder
# --------------------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W\d_]+")  # runs of letters (any script); digits, '_' and punctuation split words


def _hash_vector(key: str, dim: int) -> Tensor:
    """A fixed vector for ``key``: SHAKE-256 bytes -> uniform in [-sqrt(3), sqrt(3)] (unit variance).

    Pure integer hashing and exact float64 arithmetic, so the values are bit-identical on every machine,
    process and library version (no RNG streams, no Python ``hash()`` salting).
    """
    raw = hashlib.shake_256(key.encode("utf-8")).digest(4 * dim)
    ints = torch.tensor([int.from_bytes(raw[4 * i : 4 * i + 4], "little") for i in range(dim)], dtype=torch.float64)
    uniform = (ints + 0.5) / 2.0**32
    return ((2.0 * uniform - 1.0) * 3.0**0.5).float()


class ToyTextEncoder(nn.Module):
    """Deterministic bag-of-words-with-order encoder for the toy task (no download, no parameters).

    A prompt is lowercased and split into runs of letters; word ``i`` becomes the fixed vector of that word
    plus a small fixed vector for position ``i`` (so "red left" != "left red"). Words past ``max_len`` are
    dropped and rows past the last word are zero, like the T5 encoder's padding.

    Args:
        dim: output width. max_len: output rows. position_scale: size of the positional part relative to
            the (unit-variance) word part.
    """

    def __init__(self, dim: int = 32, max_len: int = 16, position_scale: float = 0.1):
        super().__init__()
        if dim < 1 or max_len < 1:
            raise ValueError(f"ToyTextEncoder needs dim >= 1 and max_len >= 1, got dim={dim}, max_len={max_len}")
        self.dim = int(dim)
        self.max_len = int(max_len)
        # "\x00" cannot occur in a word, so positional keys never collide with word keys.
        positions = torch.stack([_hash_vector(f"\x00position:{i}", self.dim) for i in range(self.max_len)])
        positions = positions * position_scale
        # The buffer carries the device; the sums are done on a CPU copy (tiny), then moved once.
        self.register_buffer("positions", positions, persistent=False)
        self._positions_cpu = positions
        self._words: dict[str, Tensor] = {}  # word -> vector cache, CPU
        self.eval()

    def train(self, mode: bool = True) -> ToyTextEncoder:
        return super().train(False)

    @staticmethod
    def words(prompt: str) -> list[str]:
        """The words the encoder sees: lowercase runs of letters."""
        return _WORD_RE.findall(prompt.lower())

    def _word(self, word: str) -> Tensor:
        if word not in self._words:
            self._words[word] = _hash_vector(word, self.dim)
        return self._words[word]

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> float32 [B, max_len, dim] on the module's device."""
        prompts = _check_prompts(prompts)
        out = torch.zeros(len(prompts), self.max_len, self.dim)
        for b, prompt in enumerate(prompts):
            words = self.words(prompt)[: self.max_len]
            if words:
                out[b, : len(words)] = torch.stack([self._word(w) for w in words]) + self._positions_cpu[: len(words)]
        return out.to(self.positions.device)

    def forward(self, prompts: list[str]) -> Tensor:
        return self.encode(prompts)
