import json

import pytest

from vxnb.params import collect_params, parse_value, read_params


@pytest.mark.parametrize("text, value", [("3", 3), ("-2", -2), ("0.5", 0.5), ("True", True), ("false", False),
                                         ("None", None), ("resnet50", "resnet50"), ('["a", "b"]', ["a", "b"]),
                                         ("layer4.*", "layer4.*")])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_file_then_pairs(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("dataset: folder\nimage_size: 224\nlayers: [layer3, layer4]\n")
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"dataset": "mnist", "epochs": 2}))
    assert read_params(yml) == {"dataset": "folder", "image_size": 224, "layers": ["layer3", "layer4"]}
    assert read_params(js) == {"dataset": "mnist", "epochs": 2}
    got = collect_params(yml, [("image_size", "112"), ("quick", "true")])
    assert got == {"dataset": "folder", "image_size": 112, "layers": ["layer3", "layer4"], "quick": True}


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="params: no such file"):
        read_params(tmp_path / "missing.yaml")
    bad = tmp_path / "x.txt"
    bad.write_text("a: 1")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        read_params(bad)
    lst = tmp_path / "l.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        read_params(lst)
    broken = tmp_path / "b.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_params(broken)
    with pytest.raises(ValueError, match="-p: expected a name and a value"):
        collect_params(None, [("only",)])
