"""Reading /object_info as a real ComfyUI (0.3.64) sends it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol.comfy_types import combo_options, input_types, model_files
from protocol.placeholders import ConversionError, substitute

CAPTURED = Path(__file__).resolve().parent / "fixtures" / "comfyui"


@pytest.fixture(scope="module")
def full() -> dict[str, Any]:
    return json.loads((CAPTURED / "object_info_full.json").read_text())


@pytest.fixture(scope="module")
def used() -> dict[str, Any]:
    return json.loads((CAPTURED / "object_info_used_nodes.json").read_text())


def test_input_types_of_a_sampler(full: dict[str, Any]) -> None:
    assert input_types(full)["KSampler"] == {
        "model": "MODEL",
        "seed": "INT",
        "steps": "INT",
        "cfg": "FLOAT",
        "sampler_name": "COMBO",
        "scheduler": "COMBO",
        "positive": "CONDITIONING",
        "negative": "CONDITIONING",
        "latent_image": "LATENT",
        "denoise": "FLOAT",
    }


def test_optional_inputs_count_and_hidden_ones_do_not(used: dict[str, Any]) -> None:
    types = input_types(used)
    assert types["RegexReplace"] == {
        "string": "STRING",
        "regex_pattern": "STRING",
        "replace": "STRING",
        "case_insensitive": "BOOLEAN",
        "multiline": "BOOLEAN",
        "dotall": "BOOLEAN",
        "count": "INT",
    }
    # "prompt" and "extra_pnginfo" are filled by ComfyUI, never by a workflow.
    assert types["SaveImage"] == {"images": "IMAGE", "filename_prefix": "STRING"}


def test_every_class_and_input_is_typed(used: dict[str, Any]) -> None:
    types = input_types(used)
    assert set(types) == set(used)
    for class_type, info in used.items():
        declared = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert set(types[class_type]) == set(declared)


def test_both_combo_spellings_read_as_combo(full: dict[str, Any]) -> None:
    types = input_types(full)
    options = combo_options(full)
    # [[options], {...}]
    assert types["KSampler"]["scheduler"] == "COMBO"
    assert "karras" in options["KSampler"]["scheduler"]
    # ["COMBO", {"options": [...]}] (newer ComfyUI)
    assert types["LatentConcat"]["dim"] == "COMBO"
    assert options["LatentConcat"]["dim"] == ["x", "-x", "y", "-y", "t", "-t"]
    # A combo the frontend fills at run time has no options listed.
    assert options["LoadImageOutput"]["image"] == []


def test_combo_options_only_for_combos_and_as_strings(full: dict[str, Any]) -> None:
    options = combo_options(full)
    assert set(options["KSampler"]) == {"sampler_name", "scheduler"}
    durations = options["MinimaxHailuoVideoNode"]["duration"]
    assert durations and all(isinstance(d, str) for d in durations)


def test_model_files_by_loader_input(full: dict[str, Any]) -> None:
    files = model_files(full)
    for name in (
        "ckpt_name",
        "lora_name",
        "vae_name",
        "unet_name",
        "clip_name",
        "control_net_name",
        "model_name",
    ):
        assert name in files, name
    # The capture has no model weights: only VAELoader's built-in choice is offered.
    assert files["vae_name"] == ["pixel_space"]
    assert files["ckpt_name"] == []
    # Not loaders, or not "*_name" inputs.
    assert "sampler_name" not in files
    assert "weight_dtype" not in files


def test_model_files_merges_loaders_sorted_and_unique() -> None:
    object_info = {
        "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["b.safetensors"]]}}},
        "ImageOnlyCheckpointLoader": {
            "input": {"required": {"ckpt_name": [["c.ckpt", "a.safetensors", "b.safetensors"]]}}
        },
        "LoraLoader": {
            "input": {
                "required": {"lora_name": ["COMBO", {"options": ["z.pt", "y.pt"]}]},
                "optional": {"strength": ["FLOAT", {}]},
            }
        },
        "KSampler": {"input": {"required": {"sampler_name": [["euler"]]}}},
    }
    assert model_files(object_info) == {
        "ckpt_name": ["a.safetensors", "b.safetensors", "c.ckpt"],
        "lora_name": ["y.pt", "z.pt"],
    }


def test_malformed_entries_are_skipped_not_fatal() -> None:
    object_info = {
        "Broken": "not a class",
        "NoInputs": {"output": ["IMAGE"]},
        "Odd": {
            "input": {
                "required": {"empty": [], "number": 5, "good": ["INT", {"min": 0}]},
                "optional": None,
            }
        },
    }
    assert input_types(object_info) == {"Odd": {"good": "INT"}}
    assert combo_options(object_info) == {}


def test_types_from_a_real_capture_convert_substituted_values(used: dict[str, Any]) -> None:
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": "$text(w, 64)", "height": 64}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"seed": "$random()", "strength": "$text(s)"}},
    }
    result, _ = substitute(
        workflow,
        {"s": "0.25"},
        {},
        random_source=lambda: 7,
        timestamp_ms=0,
        input_types=input_types(used),
    )
    assert result["1"]["inputs"]["width"] == 64
    assert result["2"]["inputs"] == {"seed": 7, "strength": 0.25}
    with pytest.raises(ConversionError, match="node 1 input 'width': 'wide' is not an INT"):
        substitute(
            workflow,
            {"w": "wide", "s": "1"},
            {},
            random_source=lambda: 7,
            timestamp_ms=0,
            input_types=input_types(used),
        )
