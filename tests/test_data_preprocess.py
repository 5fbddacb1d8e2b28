"""Preprocessing with a tiny random AutoencoderKLWan, a tiny UMT5 and a tokenizer built in code (no downloads):
the text rule against diffusers' WanPipeline, the latents against a direct VAE call, the CLI, resume."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed (pip install av; the test extra has it)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the test extra has it)")

from tmd_megatron.cli.preprocess import main as cli  # noqa: E402
from tmd_megatron.data import PromptEncoder, make_loader, pad_context  # noqa: E402
from tmd_megatron.data.preprocess import (  # noqa: E402
    WAN_LATENT_MEAN, WAN_LATENT_STD, PreprocessError, WanVAE, read_video,
)

WORDS = "a the red green blue cat dog runs jumps over under big small city night rain".split()
TEXT_LEN = 16


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_umt5(vocab_size):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8)
    return UMT5EncoderModel(cfg).eval()


def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def write_mp4(path, frames_F_H_W_3: np.ndarray, fps=16):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = frames_F_H_W_3.shape[1:3]
        s.pix_fmt, s.options = "yuv444p", {"crf": "0"}
        for f in frames_F_H_W_3:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def tiny_clip():
    """A random CLIPVisionModel (32x32 images, 8x8 patches: 17 tokens of width 16) and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    tok.save_pretrained(root / "text")
    tiny_umt5(len(tok)).save_pretrained(root / "text")
    tiny_vae().save_pretrained(root / "vae")
    processor, clip = tiny_clip()
    processor.save_pretrained(root / "clip")
    clip.save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    entries = []
    prompts = ["a red cat runs", "the big dog jumps over the small  cat", "blue city at night in rain",
               "&amp; green   dog", "a cat"]
    for i, prompt in enumerate(prompts):
        # Smooth content (low-frequency noise, upsampled) so lossless-ish x264 keeps it.
        small = rng.integers(0, 256, size=(9, 6, 8, 3)).astype(np.float32)
        frames = np.clip(small.repeat(8, 1).repeat(8, 2), 0, 255).astype(np.uint8)  # 9 x 48 x 64
        write_mp4(root / f"v{i}.mp4", frames)
        entries.append({"video": f"v{i}.mp4", "prompt": prompt})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    return root, entries


def test_wan_latent_statistics_match_diffusers_defaults():
    from diffusers import AutoencoderKLWan
    import inspect

    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert list(WAN_LATENT_MEAN) == defaults["latents_mean"].default
    assert list(WAN_LATENT_STD) == defaults["latents_std"].default


def test_text_padding_equals_diffusers_wan_pipeline(models):
    """Independent reference: diffusers' WanPipeline._get_t5_prompt_embeds (trim to true length, zero-pad)."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(models / "text")
    enc = UMT5EncoderModel.from_pretrained(models / "text")
    prompts = ["a red cat runs", "  the big dog  jumps over &amp;amp; the small cat ", "unknown words here",
               " ".join(["dog"] * 40)]  # longer than TEXT_LEN: truncated at tokenization, EOS dropped as Wan does
    fake_pipe = SimpleNamespace(tokenizer=tok, text_encoder=enc, _execution_device=torch.device("cpu"))
    ref = WanPipeline._get_t5_prompt_embeds(fake_pipe, prompts, max_sequence_length=TEXT_LEN)
    ours = PromptEncoder(tok, enc, text_len=TEXT_LEN)(prompts)
    assert [len(c) for c in ours] == [5, 10, 4, TEXT_LEN]
    padded = torch.stack([pad_context(c, TEXT_LEN) for c in ours])
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-6)  # grad vs no-grad kernels differ by an ulp
    assert torch.equal(padded == 0, ref == 0)  # the padding rows are exact zeros in both, nowhere else
    with pytest.raises(ValueError, match="more than text_len"):
        pad_context(torch.ones(TEXT_LEN + 1, 3), TEXT_LEN)


def test_read_video_samples_frames_and_crops(videos, tmp_path):
    root, _ = videos
    with av.open(str(root / "v0.mp4")) as c:
        raw = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    same_size = read_video(root / "v0.mp4", 9, 48, 64)
    assert torch.allclose(same_size, torch.from_numpy(raw).permute(3, 0, 1, 2).float() / 127.5 - 1)
    # Frame i is flat grey 20·i with a mirror-symmetric bright bar: 9 -> 5 frames must pick 0, 2, 4, 6, 8, and
    # the 48x64 -> 32x32 cover-and-centre-crop must keep the mirror symmetry.
    frames = np.zeros((9, 48, 64, 3), np.uint8) + (20 * np.arange(9, dtype=np.uint8)).reshape(9, 1, 1, 1)
    frames[:, 16:32, 24:40] = 250
    write_mp4(tmp_path / "grey.mp4", frames)
    x = read_video(tmp_path / "grey.mp4", 5, 32, 32)
    assert x.shape == (3, 5, 32, 32) and x.min() >= -1 and x.max() <= 1
    corner = (x[:, :, 0, 0] + 1) * 127.5
    assert torch.allclose(corner, torch.tensor([0.0, 40, 80, 120, 160]).expand(3, 5), atol=2)
    assert torch.allclose(x, x.flip(-1), atol=2 / 127.5)
    with pytest.raises(PreprocessError, match="fewer than num_frames=13"):
        read_video(root / "v0.mp4", 13, 32, 32)
    with pytest.raises(PreprocessError, match="cannot decode"):
        read_video(root / "manifest.jsonl", 5, 32, 32)


def test_cli_videos_to_shards_round_trip_and_resume(models, videos, tmp_path):
    root, entries = videos
    out = tmp_path / "out"
    args = ["videos", str(root / "manifest.jsonl"), str(out), "--vae", str(models / "vae"), "--text-encoder",
            str(models / "text"), "--frames", "5", "--height", "32", "--width", "32", "--text-len", str(TEXT_LEN),
            "--batch-size", "2", "--samples-per-shard", "2", "--dtype", "fp32", "--no-progress"]
    assert cli(args) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    batches = list(make_loader(out, 1, backend="torch", text_len=TEXT_LEN, num_epochs=1))
    assert len(batches) == 5

    vae = WanVAE.from_pretrained(models / "vae")
    encoder = PromptEncoder.from_pretrained(models / "text", text_len=TEXT_LEN)
    for b in batches:
        i = b["meta"][0]["entry"]
        video = read_video(root / entries[i]["video"], 5, 32, 32)
        with torch.no_grad():  # independent normalisation: the VAE's own config statistics
            mu = vae.vae.encode(video[None]).latent_dist.mode()
        cfg = vae.vae.config
        ref = (mu - torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)) / torch.tensor(cfg.latents_std).view(
            1, 16, 1, 1, 1)
        assert b["latent"].shape == (1, 16, 2, 4, 4)
        torch.testing.assert_close(b["latent"], ref, rtol=1e-5, atol=1e-5)
        ctx = encoder([entries[i]["prompt"]])[0]
        assert b["prompt"][0] == entries[i]["prompt"] and int(b["context_len"][0]) == len(ctx)
        torch.testing.assert_close(b["context"][0], pad_context(ctx, TEXT_LEN), rtol=1e-5, atol=1e-6)
        decoded = vae.decode(b["latent"])  # round trip video -> latent -> video with the tiny VAE
        assert decoded.shape == (1, 3, 5, 32, 32) and torch.isfinite(decoded).all()
        torch.testing.assert_close(decoded, vae.vae.decode(mu).sample, rtol=1e-4, atol=1e-5)

    # Resume: a lost shard is redone, finished ones are kept byte for byte.
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "shard-000001.tar.idx.json").unlink()
    assert cli(args) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    other = list(args)
    other[other.index("--samples-per-shard") + 1] = "3"
    assert cli(other) == 2  # other settings into the same folder are refused


def test_unreadable_video_is_named_or_skipped(models, videos, tmp_path, capsys):
    root, entries = videos
    bad = tmp_path / "manifest.jsonl"
    (tmp_path / "v0.mp4").write_bytes((root / "v0.mp4").read_bytes())
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    bad.write_text(json.dumps({"video": "v0.mp4", "prompt": "a cat"}) + "\n"
                   + json.dumps({"video": "broken.mp4", "prompt": "a dog"}) + "\n")
    args = ["videos", str(bad), str(tmp_path / "out"), "--vae", str(models / "vae"), "--text-encoder",
            str(models / "text"), "--frames", "5", "--height", "32", "--width", "32", "--text-len",
            str(TEXT_LEN), "--dtype", "fp32", "--no-progress"]
    assert cli(args) == 2
    assert "broken.mp4" in capsys.readouterr().err
    assert cli(args + ["--on-error", "skip"]) == 0
    assert [b["prompt"] for b in make_loader(tmp_path / "out", 1, backend="torch", text_len=TEXT_LEN,
                                             num_epochs=1)] == [["a cat"]]


def test_bad_video_sizes_name_the_rule():
    from tmd_megatron.data.preprocess import check_video_size

    with pytest.raises(PreprocessError, match="4n\\+1"):
        check_video_size(80, 480, 832)
    with pytest.raises(PreprocessError, match="multiples of 16"):
        check_video_size(81, 480, 830)


def test_cli_i2v_writes_the_first_frames_conditioning_latent_and_clip_tokens(models, videos, tmp_path):
    """--i2v: the VAE latent of (first frame, zero frames), as Wan2.1's image2video.py builds y; --image-encoder: the
    penultimate CLIPVisionModel layer of the first frame's 8-bit pixels, as diffusers' WanImageToVideoPipeline."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    root, entries = videos
    out = tmp_path / "out"
    args = ["videos", str(root / "manifest.jsonl"), str(out), "--vae", str(models / "vae"), "--text-encoder",
            str(models / "text"), "--frames", "5", "--height", "32", "--width", "32", "--text-len", str(TEXT_LEN),
            "--dtype", "fp32", "--no-progress", "--i2v", "--image-encoder", str(models / "clip")]
    assert cli(args) == 0
    vae = WanVAE.from_pretrained(models / "vae")
    processor, clip = CLIPImageProcessor.from_pretrained(models / "clip"), CLIPVisionModel.from_pretrained(models / "clip")
    batches = list(make_loader(out, 1, backend="torch", text_len=TEXT_LEN, num_epochs=1))
    assert len(batches) == 5
    for b in batches[:2]:
        video = read_video(root / entries[b["meta"][0]["entry"]]["video"], 5, 32, 32)
        first_only = torch.cat([video[:, :1], torch.zeros_like(video[:, 1:])], dim=1)
        with torch.no_grad():
            mu = vae.vae.encode(first_only[None]).latent_dist.mode()
            pixels = ((video[:, 0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tokens = clip(**processor(images=[pixels], return_tensors="pt"), output_hidden_states=True).hidden_states[-2]
        cfg = vae.vae.config
        ref = (mu - torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)) / torch.tensor(cfg.latents_std).view(
            1, 16, 1, 1, 1)
        torch.testing.assert_close(b["cond"], ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(b["cond"][:, :, 1:], b["latent"][:, :, 1:], atol=1e-2)  # later frames: zeros
        torch.testing.assert_close(b["clip"], tokens, rtol=1e-5, atol=1e-5)
        assert b["clip"].shape == (1, 17, 16)
    assert cli(args[:-3] + ["--image-encoder", str(models / "clip")]) == 2  # CLIP tokens without --i2v


def test_vae_normalisation_follows_its_config_for_wan22_channels():
    """A 48-channel VAE (the Wan2.2 VAE's width) is normalised with its own config statistics."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    mean, std = torch.linspace(-1, 1, 48).tolist(), torch.linspace(0.5, 2, 48).tolist()
    raw = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std).eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        mu = raw.encode(video).latent_dist.mode()
    got = WanVAE(raw).encode(video)
    torch.testing.assert_close(got, (mu - torch.tensor(mean).view(1, 48, 1, 1, 1)) / torch.tensor(std).view(
        1, 48, 1, 1, 1))
    with pytest.raises(PreprocessError, match="no latents_mean"):
        WanVAE(AutoencoderKLWan(base_dim=8, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                temperal_downsample=[False, True, True]))
