import os

import pytest

from dscompress.core.errors import DscompressError
from dscompress.pipeline import recipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")

GOOD = """
model: {name: resnet18, num_classes: 10, input_size: [3, 16, 16]}
data: digits
steps:
  - finetune: {name: baseline, teacher: none, epochs: 1}
  - convert: {macs-budget: 0.25}
  - export: {}
"""


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(RECIPES) if f.endswith(".yaml")))
def test_shipped_recipes_are_valid(name):
    parsed = recipe.load(os.path.join(RECIPES, name))
    assert parsed.steps and parsed.model["name"]


def test_parse_normalises_names_and_defaults():
    parsed = recipe.parse(GOOD, "good.yaml")
    assert [s.name for s in parsed.steps] == ["baseline", "02-convert", "03-export"]
    assert parsed.steps[1].options == {"macs_budget": 0.25}
    config = parsed.config(parsed.steps[0])
    assert (config.data, config.teacher, config.epochs) == ("digits", "none", 1)


def test_a_step_can_start_from_an_earlier_model():
    text = GOOD.replace("  - export: {}", "  - prune: {name: pruned, from: baseline, ratio: 0.5}\n  - export: {}")
    parsed = recipe.parse(text, "good.yaml")
    assert [s.start for s in parsed.steps] == [None, None, "baseline", None]
    assert parsed.steps[2].options == {"ratio": 0.5}
    assert parsed.steps[2].to_dict()["from"] == "baseline"


@pytest.mark.parametrize(
    "text,facts",
    [
        (GOOD.replace("macs-budget: 0.25", "rnak: 1"), ["good.yaml:6: steps[1].convert.rnak:"]),
        (GOOD.replace("epochs: 1", "epochs: five"), ["good.yaml:5: steps[0].finetune.epochs:", "'five'"]),
        (GOOD.replace("model: {name: resnet18, ", "model: {"), ["good.yaml:2: model:", "'name'"]),
        (GOOD.replace("- export: {}", "- sparsify: {}"), ["good.yaml:7: steps[2].sparsify:"]),
        (GOOD.replace("data: digits", "datta: digits"), ["good.yaml:3: datta:"]),
        (GOOD.replace("macs-budget: 0.25", "macs-budget: 1.5"), ["good.yaml:6: steps[1].convert.macs-budget:", "1.5"]),
        (GOOD.replace("  - convert: {macs-budget: 0.25}\n", "  - convert: {rank: 1}\n  - validate: {}\n").replace("  - export: {}\n", ""), ["good.yaml:7: steps[2].validate:", "export"]),
        ("steps: [", ["good.yaml:1:", "YAML"]),
        ("model: {name: resnet18}\n", ["good.yaml:1: steps:"]),
        (GOOD.replace("name: baseline,", "name: x,").replace("{macs-budget: 0.25}", "{name: x}"), ["'x'", "twice"]),
        (GOOD.replace("{macs-budget: 0.25}", "{from: base, rank: 1}"), ["good.yaml:6: steps[1].convert.from:", "baseline"]),
        (GOOD.replace("  - export: {}", "  - export: {name: onnx}\n  - prune: {from: onnx}"), ["steps[3].prune.from:", "02-convert"]),
    ],
    ids=["unknown-option", "wrong-type", "missing-name", "unknown-step", "unknown-top-key", "bad-value", "validate-first", "bad-yaml", "no-steps", "duplicate-name", "from-unknown", "from-not-a-model"],
)
def test_bad_recipes_name_the_place(text, facts):
    with pytest.raises(DscompressError) as info:
        recipe.parse(text, "good.yaml")
    assert all(fact in str(info.value) for fact in facts), info.value


def test_every_problem_is_reported_at_once():
    text = GOOD.replace("epochs: 1", "epochs: x").replace("macs-budget: 0.25", "rnak: 1")
    with pytest.raises(DscompressError) as info:
        recipe.parse(text, "good.yaml")
    assert len(str(info.value).splitlines()) == 2


def test_overrides():
    parsed = recipe.parse(GOOD, "good.yaml", ["finetune.epochs=3", "baseline.lr=0.1", "model.num_classes=4", "02-convert.rank=2", "convert.macs_budget=null"])
    assert parsed.steps[0].options["epochs"] == 3 and parsed.steps[0].options["lr"] == 0.1
    assert parsed.model["num_classes"] == 4
    with pytest.raises(DscompressError, match="'prune.ratio=0.5'.*'prune'"):
        recipe.parse(GOOD, "good.yaml", ["prune.ratio=0.5"])
    with pytest.raises(DscompressError, match="'epochs=3'"):
        recipe.parse(GOOD, "good.yaml", ["epochs=3"])


def test_missing_recipe_file():
    with pytest.raises(DscompressError, match="/nonexistent.yaml"):
        recipe.load("/nonexistent.yaml")
