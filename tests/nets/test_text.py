"""Text encoders: Wan T5 <-> HF UMT5 key map, bit-exact loading, padding rows, tokenizer path, prompt
cleaning, toy encoder. Tiny configs of the real transformers classes on CPU."""

import io
import json

import pytest
import torch

from sfplus.nets.text import (
    EncoderCheckpointError,
    ToyTextEncoder,
    UMT5TextEncoder,
    _hash_vector,
    clean_prompt,
    hf_t5_to_wan,
    load_tokenizer,
    umt5_config_from_wan,
    umt5_xxl_config,
    wan_t5_to_hf,
)

transformers = pytest.importorskip("transformers")
UMT5Config, UMT5EncoderModel = transformers.UMT5Config, transformers.UMT5EncoderModel

VOCAB = 64
SENTENCES = [
    "a red square moves to the left",
    "the blue circle bounces off the wall",
    "a cat sits on a mat in the sun",
    "two dogs run in the park at dawn",
    "a green triangle slides down slowly",
]


def tiny_config() -> "UMT5Config":
    # Same fixed choices as Wan's T5 (max distance 128, eps 1e-6, gated tanh-GELU), tiny sizes.
    return UMT5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = UMT5EncoderModel(tiny_config()).eval()
    # HF initialises the relative-position tables to tiny values; make them matter for the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_()
    return model


@pytest.fixture(scope="module")
def wan_sd(hf_model):
    return {k: v.clone() for k, v in hf_t5_to_wan(hf_model.state_dict()).items()}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A google/umt5-xxl-like tokenizer folder (spiece.model + tokenizer_config.json), trained on the fly."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_writer=buf,
        vocab_size=VOCAB - 4,
        model_type="unigram",
        pad_id=0,  # umt5 layout: pad 0, eos 1, unk 2, no bos
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("umt5_tokenizer")
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    return folder


def padded_batch(lengths, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), total), generator=g)
    mask = (torch.arange(total)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0 past the end, like the tokenizer


# ---------------------------------------------------------------------------------------------------------------
# key map and loading
# ---------------------------------------------------------------------------------------------------------------


def test_key_map_matches_wan_layout_and_inverts(hf_model, wan_sd):
    expected = {"token_embedding.weight", "norm.weight"}
    for i in range(2):
        expected |= {
            f"blocks.{i}.{s}"
            for s in [
                "norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                "pos_embedding.embedding.weight", "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight",
                "ffn.fc2.weight",
            ]
        }  # fmt: skip
    assert set(wan_sd) == expected  # 1 + 10 per block + 1 (the real file: 242 = 2 + 24 * 10)
    hf_sd = hf_model.state_dict()
    # The GELU branch is HF's wi_0, the linear branch wi_1 (docs/wan_architecture.md, 'T5 key map').
    ffn = "encoder.block.1.layer.1.DenseReluDense"
    assert torch.equal(wan_sd["blocks.1.ffn.gate.0.weight"], hf_sd[f"{ffn}.wi_0.weight"])
    assert torch.equal(wan_sd["blocks.1.ffn.fc1.weight"], hf_sd[f"{ffn}.wi_1.weight"])
    back = wan_t5_to_hf(wan_sd)
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_config_read_off_shapes(wan_sd):
    config = umt5_config_from_wan(wan_sd)
    ref = tiny_config()
    for field in ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "is_gated_act"]:  # fmt: skip
        assert getattr(config, field) == getattr(ref, field), field
    assert umt5_xxl_config().d_model == 4096 and umt5_xxl_config().num_layers == 24


@pytest.mark.parametrize("explicit_config", [False, True])
def test_wan_state_dict_loads_bit_exact(hf_model, wan_sd, explicit_config):
    enc = UMT5TextEncoder.from_wan_state_dict(wan_sd, config=tiny_config() if explicit_config else None, max_len=24)
    assert enc.dim == 32 and enc.max_len == 24
    assert enc.model.encoder.embed_tokens.weight is enc.model.shared.weight  # still tied after assign-loading
    assert not any(p.requires_grad for p in enc.parameters())
    ids, mask = padded_batch([24, 9, 1], 24)  # > 8 tokens: exercises the log-spaced relative buckets too
    out = enc.encode_tokens(ids, mask)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (3, 24, 32) and out.dtype == torch.float32
    valid = mask.bool()
    assert torch.equal(out[valid], ref[valid])


def test_padding_rows_are_zero_and_valid_rows_are_not(wan_sd):
    enc = UMT5TextEncoder.from_wan_state_dict(wan_sd, max_len=16)
    ids, mask = padded_batch([16, 5, 1], 16, seed=1)
    out = enc.encode_tokens(ids, mask)
    for b, n in enumerate([16, 5, 1]):
        assert (out[b, n:] == 0).all()
        assert (out[b, :n].abs().sum(-1) > 0).all()
    # A padded prompt's valid rows do not depend on how much padding follows (the mask works).
    short = enc.encode_tokens(ids[1:2, :5], mask[1:2, :5])
    assert torch.allclose(short[0], out[1, :5], atol=1e-6)


def test_missing_and_unknown_keys_are_listed(wan_sd):
    broken = dict(wan_sd)
    del broken["blocks.1.ffn.fc2.weight"], broken["norm.weight"]
    with pytest.raises(EncoderCheckpointError, match="missing keys") as err:
        UMT5TextEncoder.from_wan_state_dict(broken, source="my_t5.pth")
    msg = str(err.value)
    assert "my_t5.pth" in msg and "blocks.1.ffn.fc2.weight" in msg and "norm.weight" in msg
    with pytest.raises(EncoderCheckpointError, match="blocks.0.attn.extra.weight"):
        wan_t5_to_hf({**wan_sd, "blocks.0.attn.extra.weight": torch.zeros(1)})
    bad_shape = {**wan_sd, "blocks.0.norm1.weight": torch.zeros(31)}
    with pytest.raises(EncoderCheckpointError, match=r"blocks.0.norm1.weight: \(31,\)"):
        UMT5TextEncoder.from_wan_state_dict(bad_shape, config=tiny_config())


def test_frozen_encoder_stays_in_eval_mode(wan_sd):
    enc = UMT5TextEncoder.from_wan_state_dict(wan_sd)
    enc.train()
    assert not enc.training and not enc.model.training


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and files
# ---------------------------------------------------------------------------------------------------------------


def test_encode_prompts_from_files(hf_model, wan_sd, tokenizer_dir, tmp_path):
    torch.save(wan_sd, tmp_path / "models_t5_tiny.pth")
    enc = UMT5TextEncoder.load(tmp_path / "models_t5_tiny.pth", tokenizer_dir, dtype=torch.float32, max_len=16)
    prompts = ["A red\tsquare", "the  cat", " ".join(SENTENCES)]
    out = enc.encode(prompts)
    assert out.shape == (3, 16, 32)

    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) <= VOCAB
    batch = tok([clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=16,
                return_tensors="pt")  # fmt: skip
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    assert lengths[0] < 16 and lengths[1] < 16 and lengths[2] == 16
    assert ids[2, -1] == 1 and ids[0, lengths[0] - 1] == 1  # EOS (id 1) ends every prompt, also when truncated
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
    for b, n in enumerate(lengths):
        assert torch.equal(out[b, :n], ref[b, :n])
        assert (out[b, n:] == 0).all()

    # The same model saved as an HF folder loads directly and agrees.
    hf_model.save_pretrained(tmp_path / "hf_text_encoder")
    enc_hf = UMT5TextEncoder.load(tmp_path / "hf_text_encoder", tokenizer_dir, dtype=torch.float32, max_len=16)
    assert torch.equal(enc_hf.encode(prompts), out)


def test_missing_files_name_the_path(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_t5.pth"):
        UMT5TextEncoder.load(tmp_path / "no_such_t5.pth", tokenizer_dir)
    torch.save({}, tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="no_tokenizer_here"):
        UMT5TextEncoder.load(tmp_path / "x.pth", tmp_path / "no_tokenizer_here")
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_tok"):
        load_tokenizer(tmp_path / "empty_tok")


def test_prompts_must_be_a_list_of_str(wan_sd):
    enc = UMT5TextEncoder.from_wan_state_dict(wan_sd)
    with pytest.raises(TypeError, match="list of str"):
        enc.encode("a single string")
    with pytest.raises(ValueError, match="without a tokenizer"):
        enc.encode(["no tokenizer given"])


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("  a   red\n\tsquare  ", "a red square"),
        ("fish &amp;amp; chips", "fish & chips"),  # html.unescape twice
        ("&lt;b&gt;bold", "<b>bold"),
        ("色调艳丽，过曝，静态", "色调艳丽,过曝,静态"),  # full-width comma -> ASCII, as ftfy does
        ("ＬＯＵＤ\u3000ＮＯＩＳＥ", "LOUD NOISE"),  # full-width letters, ideographic space
        ("\u201cit\u2019s\u201d", '"it\'s"'),  # curly quotes
        ("\ufb01sh \ufb02ow", "fish flow"),  # Latin ligatures
        ("a\x00b\x7fc\ufeff", "abc"),  # control characters, BOM
        ("\x1b[31mred\x1b[0m", "red"),  # terminal escapes
        ("cafe\u0301", "caf\u00e9"),  # NFC
        ("\x93quoted\x94", '"quoted"'),  # C1 controls read as Windows-1252 (curly quotes), then uncurled
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


# ---------------------------------------------------------------------------------------------------------------
# toy encoder
# ---------------------------------------------------------------------------------------------------------------


def test_toy_encoder_is_deterministic_and_discriminative():
    a, b = ToyTextEncoder(), ToyTextEncoder()
    assert (a.dim, a.max_len) == (32, 16)
    assert list(a.parameters()) == [] and not a.training
    prompts = ["a red square moves left", "a blue circle moves right", "left moves square red a", ""]
    out = a.encode(prompts)
    assert out.shape == (4, 16, 32) and out.dtype == torch.float32
    assert torch.equal(out, b.encode(prompts))  # independent instances agree bit for bit
    assert not torch.allclose(out[0], out[1])  # different words
    assert not torch.allclose(out[0], out[2])  # same words, different order
    assert (out[0, 5:] == 0).all() and (out[0, :5].abs().sum(-1) > 0).all()
    assert (out[3] == 0).all()
    # Case, digits and punctuation only separate words.
    assert torch.equal(a.encode(["A RED, square;moves 2 left!"]), out[:1])


def test_toy_encoder_values_are_pinned_and_truncated():
    # Pinned values: the encoding is a pure function of the text (SHAKE-256), identical on every machine.
    ref = torch.tensor([-0.4029734134674072, -1.5617713928222656, 0.5530653595924377, 0.2693635821342468])
    assert torch.equal(_hash_vector("red", 4), ref)
    enc = ToyTextEncoder(dim=4, max_len=3, position_scale=0.0)
    out = enc.encode(["red red red red red"])
    assert out.shape == (1, 3, 4)
    assert torch.equal(out[0], ref.expand(3, 4))
    with pytest.raises(ValueError, match="dim >= 1"):
        ToyTextEncoder(dim=0)
    with pytest.raises(TypeError, match="list of str"):
        enc.encode("red")



def test_real_umt5_xxl_layout_on_meta():
    # The real file's layout (docs/wan_architecture.md, 'T5 text encoder'): 242 Wan keys, 5,680,910,336 parameters;
    # nothing is allocated.
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_xxl_config())
    wan = hf_t5_to_wan(model.state_dict())
    assert len(wan) == 242 and sum(v.numel() for v in wan.values()) == 5_680_910_336
    enc = UMT5TextEncoder.from_wan_state_dict(wan)
    assert (enc.dim, enc.max_len, enc.model.config.num_heads, enc.model.config.d_kv) == (4096, 512, 64, 64)
