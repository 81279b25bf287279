import json
import math

import pytest

from wanlite.params import FIELDS, MAX_SEED, GenerationParams, json_schema, validate

HOSTED = {  # the hosted API's table "Request parameters"
    "height": (480, 1, 480),
    "width": (640, 1, 640),
    "num_inference_steps": (30, 1, 100),
    "num_frames": (81, 1, 120),
    "guidance_scale": (5.0, 0, 10),
}


def test_defaults_are_the_hosted_apis():
    p = validate(prompt="a cat")
    assert p == GenerationParams(prompt="a cat")
    assert (p.negative_prompt, p.seed) == (" ", None)
    for name, (default, lo, hi) in HOSTED.items():
        assert getattr(p, name) == default
        f = next(f for f in FIELDS if f.name == name)
        assert (f.minimum, f.maximum) == (lo, hi)


@pytest.mark.parametrize("name", sorted(HOSTED))
def test_bounds_inclusive_and_outside_rejected(name):
    _, lo, hi = HOSTED[name]
    assert getattr(validate(prompt="x", **{name: lo}), name) == lo
    assert getattr(validate(prompt="x", **{name: hi}), name) == hi
    step = 1 if name != "guidance_scale" else 0.01
    for bad in (lo - step, hi + step):
        with pytest.raises(ValueError, match=rf"{name} must be .* \[{lo}, {hi}\]"):
            validate(prompt="x", **{name: bad})


@pytest.mark.parametrize(
    "name,value",
    [
        ("height", True),
        ("height", 240.0),
        ("height", "240"),
        ("width", None),
        ("num_frames", False),
        ("num_inference_steps", 2.5),
        ("guidance_scale", math.nan),
        ("guidance_scale", math.inf),
        ("guidance_scale", "5"),
        ("guidance_scale", True),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("seed", 1.0),
        ("seed", True),
        ("prompt", ""),
        ("prompt", "   "),
        ("prompt", None),
        ("prompt", 3),
        ("negative_prompt", None),
    ],
)
def test_wrong_type_or_value_names_the_field(name, value):
    with pytest.raises(ValueError, match=name):
        validate({"prompt": "x", name: value})


def test_missing_prompt_and_unknown_fields():
    with pytest.raises(ValueError, match="prompt is required"):
        validate(height=16)
    with pytest.raises(ValueError, match="unknown parameter.*fps"):
        validate(prompt="x", fps=16)


def test_numbers_are_normalized():
    p = validate(prompt="x", guidance_scale=3, seed=7)
    assert isinstance(p.guidance_scale, float) and p.guidance_scale == 3.0
    assert p.seed == 7
    assert validate(prompt="x", negative_prompt="").negative_prompt == ""


def test_json_schema_matches_fields():
    s = json_schema()
    json.dumps(s)
    assert s["required"] == ["prompt"] and s["additionalProperties"] is False
    for name, (default, lo, hi) in HOSTED.items():
        prop = s["properties"][name]
        assert (prop["default"], prop["minimum"], prop["maximum"]) == (default, lo, hi)
    assert s["properties"]["seed"]["type"] == ["integer", "null"]
    assert s["properties"]["negative_prompt"]["default"] == " "


def test_json_schema_agrees_with_validate():
    import jsonschema

    schema = json_schema()
    cases = [{"prompt": "x"}, {"prompt": "x", "height": 0}, {"prompt": "x", "seed": None}]
    cases += [{"prompt": "x", "guidance_scale": 10.5}, {"prompt": "x", "num_frames": 120}]
    for case in cases:
        ok_schema = jsonschema.Draft202012Validator(schema).is_valid(case)
        try:
            validate(case)
            ok_ours = True
        except ValueError:
            ok_ours = False
        assert ok_schema == ok_ours, case


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_text_that_is_not_unicode_is_refused_naming_the_field(name):
    with pytest.raises(ValueError, match=rf"^{name} is not valid Unicode") as e:
        validate(**{"prompt": "a fox", name: "a\ud800b"})
    assert e.value.param == name
    assert "\\ud800" in str(e.value)
    str(e.value).encode("utf-8")  # the message itself is always encodable
    assert validate(prompt="un café ☕, 狐").prompt == "un café ☕, 狐"  # real text is fine


def test_unknown_names_are_quoted_safely():
    with pytest.raises(ValueError, match="unknown parameter") as e:
        validate({"prompt": "x", "\ud800": 1})
    str(e.value).encode("utf-8")
    assert "'\\ud800'" in str(e.value) and e.value.param == "\ud800"
    with pytest.raises(ValueError, match=r"unknown parameter\(s\): fps$") as e:
        validate(prompt="x", fps=24)
    assert e.value.param == "fps"
