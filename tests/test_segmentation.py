"""Segmentation end to end: torchvision's DeepLabV3/FCN/LRASPP by name, masks, mIoU, per-pixel
distillation, atrous separable conversion, and the pipeline on a tiny model (``conftest:tiny_seg``)."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import error_line, tiny_seg
from PIL import Image
from torch.utils.data import Subset

from dscompress.cli.main import cli
from dscompress.compress.calibrate import CalibrateConfig, calibrate
from dscompress.compress.convert import ConvertConfig, convert
from dscompress.compress.prune import PruneConfig, prune
from dscompress.core.errors import DscompressError
from dscompress.data.augment import Augmented
from dscompress.data.datasets import DIGITS_SEG_INK, MEAN, STD, digits_seg_arrays, load_dataset, make_loader
from dscompress.models.build import ModelSpec, SegmentationNet, build_model, model_tasks, segmentation_models
from dscompress.nn.metrics import IGNORE_INDEX, check_targets, in_percent, task_metrics
from dscompress.train.distill import distillation_loss
from dscompress.train.finetune import FinetuneConfig, finetune

SEGMENTATION = [
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
]
SIZE = (3, 32, 32)
TINY = ["conftest:tiny_seg", "--task", "segmentation", "--num-classes", "11", "--input-size", "3,32,32"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


# --- models ---------------------------------------------------------------------------------------


def test_segmentation_models_are_named_with_their_task():
    assert sorted(segmentation_models()) == sorted(SEGMENTATION)
    tasks = model_tasks()
    assert all(tasks[name] == "segmentation" for name in SEGMENTATION) and tasks["resnet18"] == "classification"
    listed = run_ok("models", "--task", "segmentation").stdout.split()
    assert listed == [word for name in sorted(SEGMENTATION) for word in (name, "segmentation")]
    assert ModelSpec("fcn_resnet50").task == "segmentation" and ModelSpec("resnet18").task == "classification"


@pytest.mark.parametrize("name", SEGMENTATION)
def test_every_segmentation_model_converts_exactly_at_full_rank(name):
    """Offline (no weights, no backbone weights), one (N, K, H, W) output, and exact at full rank,
    dilated backbone stages and ASPP rates included."""
    model = build_model(ModelSpec(name, num_classes=5, input_size=SIZE))
    assert isinstance(model, SegmentationNet) and model.aux_classifier is None
    converted, record = convert(model, SIZE, ConvertConfig(rank="full"))
    dilated = [layer for layer in record.layers if layer.dilation_before != [1, 1]]
    assert all(layer.dilation_after == layer.dilation_before for layer in dilated)
    if name.startswith("lraspp"):  # its only dense KxK conv is the RGB stem, which is skipped
        assert not record.layers
    else:  # dilated ResNet stages, ASPP rates
        assert dilated
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        expected, got = model(x), converted(x)
    assert expected.shape == (2, 5, 32, 32)
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def test_deeplab_keeps_its_atrous_rates_when_converted():
    model = build_model(ModelSpec("deeplabv3_resnet50", num_classes=3, input_size=SIZE))
    _, record = convert(model, SIZE, ConvertConfig(rank=1, include=["classifier.*"]))
    rates = {layer.name: layer.dilation_after[0] for layer in record.layers}
    assert rates == {"classifier.0.convs.1.0": 12, "classifier.0.convs.2.0": 24, "classifier.0.convs.3.0": 36, "classifier.1": 1}


def test_state_dicts_are_torchvision_s_and_the_aux_head_is_optional(tmp_path):
    net = torchvision.models.get_model("fcn_resnet50", weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    path = str(tmp_path / "fcn.pt")
    torch.save(net.state_dict(), path)
    with pytest.warns(UserWarning, match="dropped .*aux_classifier"):
        plain = build_model(ModelSpec("fcn_resnet50", num_classes=4, checkpoint=path))
    with_aux = build_model(ModelSpec("fcn_resnet50", num_classes=4, checkpoint=path, aux=True))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(plain(x), net.eval()(x)["out"]) and torch.equal(with_aux(x), plain(x))
    out, aux = with_aux.train()(x)  # training sees both heads; eval mode runs only `out`
    assert out.shape == aux.shape == (2, 4, 32, 32)
    with pytest.raises(DscompressError, match="lraspp_mobilenet_v3_large.*--aux"):
        build_model(ModelSpec("lraspp_mobilenet_v3_large", aux=True))


def test_pruning_keeps_every_head_s_classes():
    lraspp = build_model(ModelSpec("lraspp_mobilenet_v3_large", num_classes=7, input_size=SIZE))
    pruned, record = prune(lraspp, SIZE, PruneConfig(ratio=0.3))
    assert {k["name"] for k in record.kept} == {"classifier.low_classifier", "classifier.high_classifier"}
    assert pruned(torch.randn(2, *SIZE)).shape == (2, 7, 32, 32) and record.params_after < record.params_before
    # An auxiliary head runs only in training: pruning still keeps its classes and its inputs.
    fcn = build_model(ModelSpec("fcn_resnet50", num_classes=7, input_size=SIZE, aux=True))
    pruned, record = prune(fcn, SIZE, PruneConfig(ratio=0.3))
    assert {k["name"] for k in record.kept} == {"classifier.4", "aux_classifier.4"}
    out, aux = pruned.train()(torch.randn(2, *SIZE))
    assert out.shape == aux.shape == (2, 7, 32, 32)


# --- data ----------------------------------------------------------------------------------------


def test_digits_seg_is_a_function_of_the_seed_and_its_masks_align():
    images, masks = digits_seg_arrays("test")
    again, again_masks = digits_seg_arrays("test")
    other, _ = digits_seg_arrays("test", seed=1)
    assert np.array_equal(images, again) and np.array_equal(masks, again_masks) and not np.array_equal(images, other)
    assert images.shape == (250, 1, 32, 32) and masks.shape == (250, 32, 32)
    assert set(np.unique(masks)) <= set(range(11)) and (masks == 0).mean() > 0.5  # 0 is background
    assert np.array_equal(masks > 0, images[:, 0] >= DIGITS_SEG_INK)  # labelled exactly where the ink is
    dataset = load_dataset("digits-seg", (3, 64, 64), "test")
    assert dataset.task == "segmentation" and dataset.classes[0] == "background" and len(dataset.classes) == 11
    image, mask = dataset[3]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    assert torch.equal(mask[::2, ::2], torch.from_numpy(masks[3]).long())  # nearest, on the bilinear grid
    ink = image[0] * STD[0] + MEAN[0]
    agree = ((ink >= DIGITS_SEG_INK) == (mask > 0)).float().mean()
    assert agree > 0.93  # upsampled: the mask follows the image but for a rim of interpolated pixels


def _png(path, array, palette=False):
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette:
        image = image.convert("P")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def test_voc_and_segfolder_layouts(tmp_path):
    rng = np.random.default_rng(0)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for split, stems in (("train", ["a", "b"]), ("val", ["c"])):
        for stem in stems:
            _png(str(voc / "JPEGImages" / f"{stem}.jpg"), rng.integers(0, 255, (20, 30, 3)))
            mask = np.zeros((20, 30), dtype=np.uint8)
            mask[5:15, 10:20] = 15
            mask[0, :] = IGNORE_INDEX
            _png(str(voc / "SegmentationClass" / f"{stem}.png"), mask, palette=True)
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    train = load_dataset(f"voc:{tmp_path}", (3, 40, 60), "train")
    assert len(train) == 2 and len(train.classes) == 21 and train.classes[15] == "person"
    image, mask = train[0]
    assert image.shape == (3, 40, 60) and mask.shape == (40, 60)
    assert set(mask.unique().tolist()) == {0, 15, IGNORE_INDEX} and int((mask == 15).sum()) == 20 * 20
    assert len(load_dataset(f"voc:{voc}", (3, 40, 60), "test")) == 1

    folder = tmp_path / "shapes"
    for split in ("train", "val"):
        _png(str(folder / "images" / split / "x.png"), rng.integers(0, 255, (16, 16, 3)))
        _png(str(folder / "masks" / split / "x.png"), np.eye(16, dtype=np.uint8) * 2)
    dataset = load_dataset(f"segfolder:{folder}", (1, 8, 8), "test")
    assert dataset.classes == ["0", "1", "2"] and dataset[0][0].shape == (1, 8, 8)
    (folder / "classes.txt").write_text("sky\nroad\n")
    with pytest.raises(DscompressError, match=r"x\.png.*class 2\b"):
        load_dataset(f"segfolder:{folder}", (1, 8, 8), "train")[0]


# --- metrics and losses --------------------------------------------------------------------------


def test_miou_matches_a_hand_computed_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 0]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    metrics = task_metrics("segmentation", 4)
    metrics.update(predicted, target)
    scores = in_percent(metrics.compute())
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: 2/3; class 2: 1/2; class 3 is absent: left out.
    assert scores["iou"][:3] == pytest.approx([50.0, 200 / 3, 50.0]) and scores["iou"][3] is None
    assert scores["miou"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 5 / 7)  # the ignored pixel is not scored
    with pytest.raises(DscompressError, match="class 4"):
        check_targets(torch.full_like(target, 4), num_classes=4)


def test_per_pixel_distillation():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    labels = torch.randint(0, 5, (2, 3, 4))
    labels[0, 0, 0] = IGNORE_INDEX
    hard = torch.nn.functional.cross_entropy(student, labels, ignore_index=IGNORE_INDEX)
    assert torch.allclose(distillation_loss(student, None, labels, ignore_index=IGNORE_INDEX), hard)
    assert torch.allclose(distillation_loss(student, student.clone(), labels, alpha=0.9, ignore_index=IGNORE_INDEX), 0.1 * hard)
    t = 3.0
    p, q = torch.softmax(teacher / t, 1), torch.log_softmax(student / t, 1)
    per_pixel = (p * (p.log() - q)).sum(1)  # KL over the classes at every pixel
    soft = distillation_loss(student, teacher, labels, alpha=1.0, temperature=t, ignore_index=IGNORE_INDEX)
    assert torch.allclose(soft, t * t * per_pixel.mean(), atol=1e-6)
    # Per image it is the usual batch-mean KL, unchanged.
    flat_s, flat_t = student[:, :, 0, 0], teacher[:, :, 0, 0]
    usual = torch.nn.functional.kl_div(torch.log_softmax(flat_s / t, 1), torch.log_softmax(flat_t / t, 1), reduction="batchmean", log_target=True)
    assert torch.allclose(distillation_loss(flat_s, flat_t, labels[:, 0, 0].clamp(max=4), alpha=1.0, temperature=t), t * t * usual)


def test_calibrate_fits_dict_output_models_on_masks():
    """Calibration matches layer outputs, so per-pixel targets change nothing: refit a converted
    DeepLab's ASPP on digits-seg batches (images with masks)."""
    model = build_model(ModelSpec("deeplabv3_resnet50", num_classes=11, input_size=SIZE))
    converted, _ = convert(model, SIZE, ConvertConfig(rank=1, include=["classifier.*"]))  # ASPP and the head's 3x3
    batches = list(itertools.islice(make_loader(load_dataset("digits-seg", SIZE, "train"), 8), 2))  # (images, masks) pairs
    calibrated, record = calibrate(converted, model, batches, CalibrateConfig(batches=2, batch_size=8, bn=False), device="cpu")
    assert record.agreement_over == "pixels" and len(record.layers) == 4
    assert record.output_error_after < 0.2 * record.output_error_before
    assert record.agreement_after > record.agreement_before
    assert all(layer.error_after < layer.error_before for layer in record.layers)


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """convert -> calibrate -> finetune -> export -> validate on a tiny segmentation model, from a baseline."""
    root = tmp_path_factory.mktemp("seg")
    base, conv, kd = root / "base", root / "conv", root / "kd"
    run_ok("finetune", *TINY, "--data", "digits-seg", "--teacher", "none", "--epochs", "1", "-o", base)
    run_ok("convert", base, "--rank", "1", "--calibrate", "digits-seg", "--calibrate-batches", "2", "-o", conv)
    run_ok("finetune", conv, "--data", "digits-seg", "--epochs", "1", "--lr", "0.02", "--keep", "best", "-o", kd)
    onnx_path = root / "kd.onnx"
    exported = run_ok("export", kd, "--onnx", onnx_path, "--providers", "cpu")
    validated = run_ok("validate", onnx_path, "--against", kd, "--providers", "cpu", "--data", "digits-seg", "--json")
    evaluated = run_ok("evaluate", kd, "--data", "digits-seg")
    return {"root": root, "base": base, "conv": conv, "kd": kd, "onnx": onnx_path, "exported": exported.output,
            "validated": json.loads(validated.stdout), "evaluated": evaluated.output}


def test_a_tiny_segmentation_model_runs_the_whole_pipeline(pipeline):
    manifest = json.loads((pipeline["kd"] / "manifest.json").read_text())
    assert manifest["model"]["task"] == "segmentation"
    assert [s["step"] for s in manifest["steps"]] == ["finetune", "convert", "calibrate", "finetune"]
    finetuned = manifest["steps"][-1]["record"]
    assert finetuned["task"] == "segmentation" and finetuned["teacher_miou"] is not None and finetuned["best_val_miou"] is not None
    metrics = manifest["metrics"]
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["pixel_acc"] <= 100 and "top1" not in metrics
    assert "mIoU" in pipeline["evaluated"] and "pixel accuracy" in pipeline["evaluated"]
    calibrated = json.loads((pipeline["conv"] / "manifest.json").read_text())["steps"][-1]["record"]
    assert calibrated["agreement_over"] == "pixels"
    # export: one output `logits` (N, K, H, W), batch dynamic
    graph = onnx.load(str(pipeline["onnx"]))
    (output,) = graph.graph.output
    dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert output.name == "logits" and dims[1:] == [11, 32, 32] and isinstance(dims[0], str)
    # validate with data: per-pixel argmax agreement
    (provider,) = pipeline["validated"]["providers"]
    agreement = provider["agreement"]
    assert provider["status"] == "pass" and agreement["over"] == "pixels"
    assert agreement["predictions"] == agreement["images"] * 32 * 32 and agreement["agreement"] > 99
    report = run_ok("report", pipeline["base"], pipeline["kd"], "--markdown").output
    assert "mIoU %" in report and "pixel acc %" in report and "top-1" not in report


def test_atrous_layers_convert_exactly_and_the_onnx_graph_keeps_their_dilations(tmp_path):
    model = tiny_seg()
    converted, record = convert(model, SIZE, ConvertConfig(rank="full", dilation="keep"))
    assert {layer.name: layer.dilation_after for layer in record.layers} == {"body.0": [2, 2], "atrous.0": [3, 3]}
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.allclose(converted(x), model(x), atol=1e-5)
    out = tmp_path / "ds"
    run_ok("convert", *TINY, "--rank", "1", "-o", out)
    run_ok("export", out, "--onnx", tmp_path / "ds.onnx", "--providers", "cpu")
    graph = onnx.load(str(tmp_path / "ds.onnx")).graph
    depthwise = []
    for node in graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("group", 1) > 1:
                depthwise.append(list(attrs.get("dilations", [1, 1])))
    assert sorted(depthwise) == [[2, 2], [3, 3]]


@pytest.mark.parametrize(
    "args,facts",
    [
        (["evaluate", *TINY, "--data", "digits"], ["digits is classification", "conftest:tiny_seg is a segmentation"]),
        (["evaluate", "conftest:make_tiny", "--num-classes", "11", "--input-size", "3,16,16", "--data", "digits-seg"],
         ["digits-seg is segmentation", "conftest:make_tiny is a classification"]),
        (["finetune", *TINY, "--data", "digits", "--teacher", "none", "-o", "{out}"], ["digits is classification"]),
        (["evaluate", "conftest:tiny_seg", "--num-classes", "11", "--input-size", "3,32,32", "--data", "digits-seg"],
         ["(1, 11, 32, 32)", "--task segmentation"]),
        (["evaluate", *TINY[:4], "3", "--input-size", "3,16,16", "--data", "segfolder:{bad}"], ["class 7", "0..2"]),
        (["convert", "resnet18", "--aux", "-o", "{out}"], ["--aux"]),
    ],
    ids=["segmentation-model-classification-data", "classifier-segmentation-data", "finetune-mismatch", "factory-without-task",
         "mask-out-of-range", "aux-on-a-classifier"],
)
def test_mismatches_are_one_line_and_exit_2(args, facts, tmp_path):
    bad = tmp_path / "bad"
    for split in ("train", "val"):
        _png(str(bad / "images" / split / "a.png"), np.zeros((16, 16, 3)))
        _png(str(bad / "masks" / split / "a.png"), np.full((16, 16), 7))
    (bad / "classes.txt").write_text("a\nb\nc\n")
    out = tmp_path / "out"
    line = error_line(run(*[a.format(out=out, bad=bad) for a in args]))
    assert all(fact in line for fact in facts), line
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_sums_the_confusion_matrices_of_two_processes(pipeline):
    """DDP as for classifiers: each process scores half the test canvases, the confusion matrices
    are summed, so the teacher's mIoU is exactly the one evaluated in one process."""
    out = str(pipeline["root"] / "ddp")
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dscompress", "finetune",
               str(pipeline["conv"]), "--teacher", str(pipeline["base"]), "--data", "digits-seg", "--epochs", "1", "--device", "cpu",
               "--json", "-o", out]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["world_size"] == 2 and record["task"] == "segmentation" and record["test_images"] == 250
    assert record["teacher_miou"] == pytest.approx(load_metrics(pipeline["base"])["miou"], abs=1e-9)


def load_metrics(path):
    return json.loads((path / "manifest.json").read_text())["metrics"]


def _labelled(subset, dataset):
    subset.classes, subset.task = dataset.classes, dataset.task
    return subset


def test_the_auxiliary_head_is_trained_with_its_weight():
    train_set, test_set = load_dataset("digits-seg", SIZE, "train"), load_dataset("digits-seg", SIZE, "test")
    train, test = _labelled(Subset(train_set, range(32)), train_set), _labelled(Subset(test_set, range(16)), test_set)
    changed = {}
    for weight in (0.5, 0.0):
        model = build_model(ModelSpec("fcn_resnet50", num_classes=11, input_size=SIZE, aux=True))
        before = model.aux_classifier[4].weight.detach().clone()
        config = FinetuneConfig(data="digits-seg", teacher="none", epochs=1, batch_size=16, aux_weight=weight, device="cpu")
        trained, record = finetune(model, None, train, test, config, task="segmentation")
        changed[weight] = not torch.equal(trained.aux_classifier[4].weight, before)
        assert record.miou is not None and record.top1 is None
        assert trained(torch.randn(2, *SIZE)).shape == (2, 11, 32, 32)  # eval mode: `out` only
    assert changed == {0.5: True, 0.0: False}


def test_crops_and_flips_move_masks_with_their_images():
    dataset = load_dataset("digits-seg", SIZE, "train")
    augmented = Augmented(dataset, flip=True)
    torch.manual_seed(0)
    for index in range(8):
        image, mask = augmented[index]
        ink = image[0] * STD[0] + MEAN[0]
        assert mask.shape == (32, 32) and mask.dtype == torch.int64
        assert ((ink >= DIGITS_SEG_INK - 1e-5) == (mask > 0)).float().mean() > 0.995
