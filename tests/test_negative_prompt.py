"""The negative prompt (CFG, KD, DMD2-v, TM-MF condition dropout): the paper's Table 8 English text by default,
Wan2.1's Chinese original as an option (issue 14)."""
from tmd_megatron.cli.preprocess import build_parser
from tmd_megatron.data.text import NEGATIVE_PROMPTS, PAPER_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT

# Table 8 of arXiv 2601.09881 as printed, typed here item by item (the reference the defaults must equal).
TABLE8 = [
    "Bright tones", "overexposed", "static", "blurred details", "subtitles", "style", "works", "paintings",
    "images", "static", "overall gray", "worst quality", "low quality", "JPEG compression residue", "ugly",
    "incomplete", "extra fingers", "poorly drawn hands", "poorly drawn faces", "deformed", "disfigured",
    "misshapen limbs", "fused fingers", "still picture", "messy background", "three legs",
    "many people in the background", "walking backwards",
]


def test_the_default_negative_prompt_is_table8():
    args = build_parser().parse_args(["negative", "enc", "out.pt"])
    assert NEGATIVE_PROMPTS[args.language] == PAPER_NEGATIVE_PROMPT == ", ".join(TABLE8)
    teacher = build_parser().parse_args(["teacher", "p.txt", "out", "--teacher", "t", "--text-encoder", "e",
                                         "--latent-shape", "16,1,2,2"])
    assert NEGATIVE_PROMPTS[teacher.negative_language] == PAPER_NEGATIVE_PROMPT


def test_wan_chinese_original_is_the_option_and_translates_item_by_item():
    assert NEGATIVE_PROMPTS["zh"] == WAN_NEGATIVE_PROMPT
    items = WAN_NEGATIVE_PROMPT.split("，")
    assert len(items) == len(TABLE8) == 28
    assert [items[i] for i, x in enumerate(TABLE8) if x == "static"] == ["静态", "静止"]  # two words, one English
    assert items[TABLE8.index("three legs")] == "三条腿"
    assert items[TABLE8.index("JPEG compression residue")].startswith("JPEG")
