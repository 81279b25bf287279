import json
import math

import pytest

from wanlite.params import (
    FIELDS,
    LIMITS,
    MAX_SEED,
    GenerationParams,
    ParamError,
    json_schema,
    validate,
)

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


# --- the exported error type and the "model" limits --------------------------------------------

MODEL_WIDER = {"height": (1, 1280), "width": (1, 1280), "num_frames": (1, 1001)}  # issues 21, 24


def test_param_error_is_exported_a_value_error_and_carries_the_field():
    import wanlite

    assert wanlite.ParamError is ParamError and issubclass(ParamError, ValueError)
    with pytest.raises(wanlite.ParamError, match=r"height must be .* \[1, 480\], got 481") as e:
        validate(prompt="x", height=481)
    assert e.value.field == e.value.param == "height"


@pytest.mark.parametrize("name", sorted(HOSTED))
def test_model_limits_widen_sizes_and_frames_only(name):
    default, lo, hi = HOSTED[name]
    lo, hi = MODEL_WIDER.get(name, (lo, hi))
    assert getattr(validate(prompt="x", limits="model", **{name: hi}), name) == hi
    assert getattr(validate(prompt="x", limits="model", **{name: lo}), name) == lo
    assert getattr(validate(prompt="x", limits="model"), name) == default  # defaults unchanged
    step = 1 if name != "guidance_scale" else 0.01
    for bad in (lo - step, hi + step):
        with pytest.raises(ParamError, match=rf"^{name} must be .* \[{lo}, {hi}\]") as e:
            validate(prompt="x", limits="model", **{name: bad})
        assert e.value.field == name
    if name in MODEL_WIDER:  # the hosted default still refuses what "model" allows
        with pytest.raises(ParamError, match=rf"\[{HOSTED[name][1]}, {HOSTED[name][2]}\]"):
            validate(prompt="x", **{name: hi})


def test_native_sizes_pass_only_under_model_limits():
    for h, w in ((480, 832), (832, 480)):
        p = validate(prompt="x", height=h, width=w, num_frames=81, limits="model")
        assert (p.height, p.width) == (h, w)
        with pytest.raises(ParamError):
            validate(prompt="x", height=h, width=w)


def test_unknown_limits_are_a_param_error():
    with pytest.raises(ParamError, match=r"limits must be one of \('hosted', 'model'\)") as e:
        validate(prompt="x", limits="wide")
    assert e.value.field == "limits"
    assert set(LIMITS) == {"hosted", "model"} and LIMITS["hosted"] == {}


def test_model_schema_differs_from_the_hosted_one_only_in_the_wider_ranges():
    import jsonschema

    hosted, model = json_schema(), json_schema("model")
    assert json_schema("hosted") == hosted
    for name, prop in hosted["properties"].items():
        wide = model["properties"][name]
        if name in MODEL_WIDER:
            assert (wide["minimum"], wide["maximum"]) == MODEL_WIDER[name]
            wide = {**wide, "minimum": prop["minimum"], "maximum": prop["maximum"]}
        assert wide == prop, name
    assert {k: v for k, v in model.items() if k != "properties"} == {
        k: v for k, v in hosted.items() if k != "properties"
    }
    cases = [{"prompt": "x", "height": 1280, "width": 832}, {"prompt": "x", "num_frames": 1001}]
    cases += [{"prompt": "x", "height": 1281}, {"prompt": "x", "num_frames": 1002}]
    for case in cases:
        ok_schema = jsonschema.Draft202012Validator(model).is_valid(case)
        try:
            validate(case, limits="model")
            ok_ours = True
        except ValueError:
            ok_ours = False
        assert ok_schema == ok_ours, case


def test_huge_numbers_are_a_param_error_naming_the_field():
    """Ints too large for a float (OverflowError) or for repr (over 4,300 digits)."""
    for value in (10**400, 10**5000):
        with pytest.raises(ParamError, match="guidance_scale must be a number in") as e:
            validate(prompt="x", guidance_scale=value)
        assert e.value.field == "guidance_scale" and len(str(e.value)) < 200
        with pytest.raises(ParamError, match="height"):
            validate(prompt="x", height=value)
