import pytest
from torch import nn

from dscompress.core.errors import DscompressError
from dscompress.core.selection import check_pattern, make_filter, matches, outermost, require_matches


@pytest.mark.parametrize(
    "name,pattern,expected",
    [
        ("layer4.0.conv1", "layer4", True),
        ("layer4.0.conv1", "layer4.*", True),
        ("layer4.0.conv1", "re:layer[34]", True),
        ("layer4.0.conv1", "*.conv1", True),
        ("layer14.0.conv1", "layer4", False),
        ("layer4.0.conv1", "re:layer4\\.1.*", False),
    ],
)
def test_patterns_match_names_and_their_parents(name, pattern, expected):
    assert matches(name, pattern) is expected


def test_filter_fn_combines_include_and_exclude():
    conv = nn.Conv2d(1, 1, 1)
    keep = make_filter(include=["layer4", "re:layer3\\.0\\..*"], exclude=["*.conv2"])
    assert keep(conv, "layer4.0.conv1") and keep(conv, "layer3.0.conv1")
    assert not keep(conv, "layer4.0.conv2") and not keep(conv, "layer3.1.conv1")
    assert make_filter()(conv, "anything")


def test_bad_patterns_are_one_line():
    with pytest.raises(DscompressError, match="'re:\\('"):
        check_pattern("re:(")
    with pytest.raises(DscompressError, match="--include.*'layer9'.*'layer1.0.conv1'"):
        require_matches(["layer9"], ["layer1.0.conv1"], "--include", "conv layer")


@pytest.mark.parametrize("names,expected", [
    (["layer4", "layer4.0.conv1", "layer3.1"], ["layer4", "layer3.1"]),
    (["layer1.0.conv1", "layer1.0.conv10"], ["layer1.0.conv1", "layer1.0.conv10"]),  # a prefix of the name, not a parent
    ([], []),
])
def test_outermost_keeps_names_not_inside_another(names, expected):
    assert outermost(names) == expected
