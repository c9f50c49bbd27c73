"""The checkpoint sidecar (``FILE.bsf.json``): written by ``bsf-nnunet weights describe``, read by the loader."""
from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_subcommand
from test_weights import BRATS, PE, nnunet_ckpt, official_ssl, save, toy

from bsf_nnunet.cli import weights as weights_cli
from bsf_nnunet.weights import ChannelMappingError, load_checkpoint, transfer_weights
from bsf_nnunet.weights.sidecar import SidecarConflictError, SidecarError, read_sidecar, sidecar_path


def test_describe_names_the_channels_once_and_the_transfer_maps_by_them(tmp_path, capsys):
    src = toy(seed=21)
    path = save(official_ssl(src), tmp_path, "model_weights_BRATS-pretrain.pt")
    nnunet_order = ["T1", "T1ce", "T2", "FLAIR"]
    with pytest.raises(ChannelMappingError, match="weights describe"):
        transfer_weights(toy(seed=22), load_checkpoint(path), target_channels=nnunet_order, verbose=False)

    assert run_subcommand(weights_cli, "weights", "describe", path, "--channels", ",".join(BRATS)) == 0
    assert json.loads(open(sidecar_path(path)).read()) == {"channel_names": BRATS}
    out = capsys.readouterr().out
    assert "FLAIR, T1ce, T1, T2" in out and "xyz (assumed)" in out and path + ".bsf.json" in out

    ck = load_checkpoint(path)
    assert ck.metadata["channel_names"] == BRATS and ck.metadata["sidecar"] == sidecar_path(path)
    model = toy(seed=22)
    rep = transfer_weights(model, ck, target_channels=nnunet_order, verbose=False)
    assert rep.channel_mapping == [(0, 2, "same"), (1, 1, "same"), (2, 3, "same"), (3, 0, "same")]
    assert torch.equal(model.state_dict()[PE][:, 3], src.state_dict()[PE][:, 0])  # FLAIR filters on FLAIR


def test_describe_refuses_a_wrong_channel_count_and_writes_nothing(tmp_path, capsys):
    path = save(official_ssl(toy(seed=23)), tmp_path)
    assert run_subcommand(weights_cli, "weights", "describe", path, "--channels", "T1,FLAIR") != 0
    assert "4 input channels" in capsys.readouterr().err
    assert read_sidecar(path) is None


def test_axis_order_and_merging_replace_the_assumed_values(tmp_path):
    path = save(official_ssl(toy(seed=24)), tmp_path)
    assert run_subcommand(weights_cli, "weights", "describe", path, "--axis-order", "zyx", "--merging", "fixed") == 0
    meta = load_checkpoint(path).metadata
    assert (meta["axis_order"], meta["merging"]) == ("zyx", "fixed")
    assert "axis_order_assumed" not in meta and "merging_assumed" not in meta


def test_a_sidecar_that_contradicts_the_checkpoint_is_refused(tmp_path):
    path = save(nnunet_ckpt(toy(cin=2, seed=25)), tmp_path)  # records T1, FLAIR
    with open(sidecar_path(path), "w") as f:
        json.dump({"channel_names": ["FLAIR", "T1"]}, f)
    with pytest.raises(SidecarConflictError) as e:
        load_checkpoint(path)
    assert sidecar_path(path) in str(e.value) and "['T1', 'FLAIR']" in str(e.value)
    with open(sidecar_path(path), "w") as f:  # the same names: nothing to choose
        json.dump({"channel_names": ["T1", "FLAIR"]}, f)
    assert load_checkpoint(path).metadata["channel_names"] == ["T1", "FLAIR"]


@pytest.mark.parametrize("text", ["{not json", '["T1"]', '{"channels": ["T1"]}', '{"axis_order": "yxz"}',
                                  '{"channel_names": "T1,,FLAIR"}'])
def test_broken_sidecars_name_the_file(tmp_path, text):
    path = save(official_ssl(toy(seed=26)), tmp_path)
    with open(sidecar_path(path), "w") as f:
        f.write(text)
    with pytest.raises(SidecarError) as e:
        load_checkpoint(path)
    assert sidecar_path(path) in str(e.value)
