"""Published weights in one command: bsf:/hf:// names resolved through huggingface_hub against a local stand-in
of the Hub (http.server on 127.0.0.1 serving made-up, toy-sized checkpoints in the official formats under the real
file names), `weights list/pull/push`, `import-model bsf:...` and `nnUNetv2_train -pretrained_weights bsf:...`.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE and the token path once, at import: in this process
the fixture sets them on ``huggingface_hub.constants``; subprocesses get them as environment variables."""
import glob
import hashlib
import io
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from bsf_nnunet.cli.main import main
from bsf_nnunet.network import BSFSwinUNETR

TOY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
REPO = "smilelab/BrainSegFounder"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please log in</body></html>"


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def published_files():
    """Toy-sized stand-ins of the published files, in their formats: MONAI SSL (module.swinViT.* + heads) and
    MONAI fine-tuned Swin-UNETR (4 channels in, TC/WT/ET out)."""
    torch.manual_seed(0)
    net = BSFSwinUNETR(4, 3, **TOY)
    ssl = {f"module.{k}": v for k, v in net.state_dict().items() if k.startswith("swinViT.")}
    ssl.update({"module.rotation_head.weight": torch.zeros(4, 192), "module.rotation_head.bias": torch.zeros(4)})
    ssl1 = {k: (v[:, :1].clone() if k.endswith("patch_embed.proj.weight") else v) for k, v in ssl.items()}
    return {
        "model_weights_BRATS-pretrain.pt": _bytes({"state_dict": ssl, "epoch": 10, "global_step": 1000}),
        "model_weights_BRATS-finetune.pt": _bytes({"state_dict": net.state_dict(), "epoch": 3}),
        "model_weights_UKB-pretrain.pt": _bytes({"state_dict": ssl, "epoch": 10}),
        "model_weights_ATLAS-pretrain.pt": _bytes({"state_dict": ssl1, "epoch": 10}),
    }


class _Handler(BaseHTTPRequestHandler):
    """``/OWNER/REPO/resolve/REVISION/FILE`` as the Hub answers it (HEAD and GET, Range, X-Error-Code)."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _error(self, code, error_code=None):
        self.send_response(code)
        self.send_header("X-Repo-Commit", COMMIT)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body):
        hub = self.server.hub
        hub["log"].append((self.command, self.path, self.headers.get("Range")))
        owner, repo, _, rev, filename = (urllib.parse.unquote(self.path).lstrip("/").split("/", 4) + [""] * 5)[:5]
        repo = f"{owner}/{repo}"
        if (repo, filename) in hub["status"]:
            return self._error(*hub["status"][(repo, filename)])
        if repo != REPO:
            return self._error(401, "RepoNotFound")
        if rev not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        data = hub["files"].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound")
        rng = self.headers.get("Range") if body else None
        if rng and hub["fail_ranged"]:
            return self._error(500)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if hub["cut_gets"] > 0:  # the connection drops halfway (HTTP/1.0: closed after this handler)
            hub["cut_gets"] -= 1
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            return
        self.wfile.write(data[start:])


@pytest.fixture
def hub(published_files, tmp_path, monkeypatch):
    """The stand-in Hub, huggingface_hub pointed at it with its cache in tmp_path; ``hub['env']`` for subprocesses."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hub = state = {"files": dict(published_files), "status": {}, "log": [], "cut_gets": 0,
                          "fail_ranged": False, "server": server, "cache": str(tmp_path / "hf" / "hub")}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": template, "HF_HUB_CACHE": state["cache"],
                        "HF_HUB_OFFLINE": False,
                        "HF_TOKEN_PATH": str(tmp_path / "hf" / "token"),
                        "HF_STORED_TOKENS_PATH": str(tmp_path / "hf" / "stored_tokens")}.items():
        monkeypatch.setattr(constants, name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "BSF_PRETRAINED_CHANNELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    state["env"] = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": state["cache"],
                    "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    yield state
    server.shutdown()
    server.server_close()


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _cached_files(hub):
    root = os.path.join(hub["cache"], "models--smilelab--BrainSegFounder")
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                  if os.path.isfile(p) or os.path.islink(p))


def _gets(hub, filename):
    return [r for r in hub["log"] if r[0] == "GET" and r[1].endswith("/" + filename)]


def test_weights_list_shows_the_table(capsys):
    rc, out, _ = _cli(capsys, "weights", "list")
    assert rc == 0
    for name in ("ukb-pretrain", "brats-pretrain", "brats-finetune", "atlas-pretrain", "atlas-finetune"):
        assert f"bsf:{name}" in out
    assert "model_weights_BRATS-finetune.pt" in out and "UK Biobank material transfer" in out and "2406.10395" in out
    rc, out, _ = _cli(capsys, "weights", "list", "--json")
    table = json.loads(out)
    assert table["weights"]["brats-finetune"]["channels"] == ["FLAIR", "T1ce", "T1", "T2"]
    assert table["weights"]["brats-finetune"]["regions"] == "brats"
    assert table["weights"]["ukb-pretrain"]["channels"] == ["T1", "FLAIR"]
    assert {e["axis_order"] for e in table["weights"].values()} == {"xyz"}
    assert table["repos"][REPO]["citation"].startswith("Cox")


def test_pull_by_name_and_by_hf_uri(hub, capsys):
    from bsf_nnunet.weights.hub import resolve_checkpoint

    rc, out, err = _cli(capsys, "weights", "pull", "bsf:brats-pretrain")
    assert rc == 0, err
    path = out.strip().splitlines()[-1]
    assert path.startswith(hub["cache"]) and path.endswith(f"snapshots/{COMMIT}/model_weights_BRATS-pretrain.pt")
    assert "Licence: UK Biobank" in err and "Please cite: Cox" in err
    # the same file by hf:// name (both spellings of a revision): from the cache, no second download or notice
    for spec in (f"hf://{REPO}/model_weights_BRATS-pretrain.pt", f"hf://{REPO}@{COMMIT}/model_weights_BRATS-pretrain.pt",
                 f"hf://{REPO}/model_weights_BRATS-pretrain.pt@main"):
        rc, out, err = _cli(capsys, "weights", "pull", spec)
        assert rc == 0 and out.strip().splitlines()[-1] == path and "Licence" not in err, err
    assert len(_gets(hub, "model_weights_BRATS-pretrain.pt")) == 1
    # the path in the cache is recognised as the published file: the table's channels and axis order
    resolved = resolve_checkpoint(path)
    assert resolved.entry.name == "brats-pretrain"
    assert resolved.source == f"hf://{REPO}@{COMMIT}/model_weights_BRATS-pretrain.pt"
    meta = resolved.load().metadata
    assert meta["channel_names"] == ["FLAIR", "T1ce", "T1", "T2"] and meta["axis_order"] == "xyz"
    assert meta["merging"] == "legacy" and meta["published"] == "bsf:brats-pretrain"


def test_interrupted_download_leaves_nothing_then_pull_resumes(hub, capsys, monkeypatch):
    from huggingface_hub import constants

    from bsf_nnunet.weights import load_checkpoint

    name = "model_weights_UKB-pretrain.pt"
    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB): 1 MB here, so that a
    # connection dropped halfway through the 5 MB toy file has something to resume from
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)
    hub["cut_gets"], hub["fail_ranged"] = 1, True  # dropped halfway, and the resumption fails too
    rc, out, err = _cli(capsys, "weights", "pull", "bsf:ukb-pretrain")
    assert rc == 2 and out == "" and "HTTP 500" in err, "\n".join(map(str, hub["log"]))
    assert not [f for f in _cached_files(hub) if f.startswith(("blobs", "snapshots"))]
    assert not glob.glob(os.path.join(hub["cache"], "**", "*.incomplete"), recursive=True)

    hub["cut_gets"], hub["fail_ranged"] = 1, False  # dropped halfway again; huggingface_hub resumes with Range
    rc, out, err = _cli(capsys, "weights", "pull", "bsf:ukb-pretrain")
    assert rc == 0, err
    ranges = [r[2] for r in _gets(hub, name)]
    assert ranges[-2] is None and ranges[-1].startswith("bytes=") and ranges[-1] != "bytes=0-"
    path = out.strip().splitlines()[-1]
    with open(path, "rb") as f:
        assert f.read() == hub["files"][name]
    assert load_checkpoint(path).metadata["format"] == "monai_ssl"


def test_offline_uses_the_cache(hub, capsys):
    from huggingface_hub import constants

    rc, out, err = _cli(capsys, "weights", "pull", "bsf:brats-pretrain")
    assert rc == 0, err
    path = out.strip()
    hub["server"].shutdown()  # no Hub any more: connections refused
    hub["server"].server_close()
    rc, out, err = _cli(capsys, "weights", "pull", "bsf:brats-pretrain")  # unreachable: the cached file
    assert rc == 0 and out.strip() == path, err
    constants.HF_HUB_OFFLINE = True  # (monkeypatched by the fixture, restored after the test)
    rc, out, err = _cli(capsys, "weights", "pull", "bsf:brats-pretrain")
    assert rc == 0 and out.strip() == path, err
    rc, out, err = _cli(capsys, "weights", "pull", "bsf:atlas-pretrain")  # never downloaded
    assert rc == 2 and "HF_HUB_OFFLINE=1" in err and "not in the Hugging Face cache" in err


def test_bad_names_and_hub_errors(hub, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from bsf_nnunet.weights.hub import _hub_error

    rc, _, err = _cli(capsys, "weights", "pull", "bsf:brats")
    assert rc == 2 and "Unknown published weights bsf:brats" in err and "bsf:brats-finetune" in err
    rc, _, err = _cli(capsys, "weights", "pull", f"hf://{REPO}/model_weights_BRATS.pt")  # 404 EntryNotFound
    assert rc == 2 and "no such file" in err
    rc, _, err = _cli(capsys, "weights", "pull", "bsf:brats-pretrain", "--revision", "v9")
    assert rc == 2 and "no such revision" in err
    rc, _, err = _cli(capsys, "weights", "pull", "hf://someone/private/model.pt")  # 401 RepoNotFound
    assert rc == 2 and "repository not found" in err and "hf auth login" in err and "HF_TOKEN" in err
    hub["status"][(REPO, "model_weights_ATLAS-pretrain.pt")] = (401, "GatedRepo")
    rc, _, err = _cli(capsys, "weights", "pull", "bsf:atlas-pretrain")
    assert rc == 2 and "gated" in err and "hf auth login" in err and "accept the licence" in err
    hub["status"][(REPO, "model_weights_ATLAS-pretrain.pt")] = (401, None)
    rc, _, err = _cli(capsys, "weights", "pull", "bsf:atlas-pretrain")
    assert rc == 2 and "HTTP 401" in err and "HF_TOKEN" in err
    rc, _, err = _cli(capsys, "weights", "pull", "hf://smilelab")
    assert rc == 2 and "hf://OWNER/REPO/FILE" in err
    # no network and nothing cached (huggingface_hub first retries for ~20 s, so only the message is checked here)
    msg = str(_hub_error(LocalEntryNotFoundError("no connection"), "hf://o/r/f.pt", "page"))
    assert "cannot be reached" in msg and "HF_HUB_OFFLINE=1" in msg
    assert not any(f.startswith("snapshots") for f in _cached_files(hub))


def test_html_instead_of_a_checkpoint_is_removed(hub, capsys):
    hub["files"]["model_weights_ATLAS-pretrain.pt"] = HTML
    for _ in range(2):  # not served from the cache the second time either
        rc, out, err = _cli(capsys, "weights", "pull", "bsf:atlas-pretrain")
        assert rc == 2 and out == "" and "HTML page" in err and "removed" in err
        assert _cached_files(hub) == [f"refs{os.sep}main"]
    assert len(_gets(hub, "model_weights_ATLAS-pretrain.pt")) == 2


def test_lowdata_run_downloads_once_and_passes_the_cached_file(hub, capsys, monkeypatch):
    import bsf_nnunet.lowdata.runner as runner
    from bsf_nnunet.weights.hub import resolve_checkpoint

    calls = []
    monkeypatch.setattr(runner, "run_lowdata", lambda *a, **kw: calls.append(kw))
    rc, _, err = _cli(capsys, "lowdata", "run", "-d", "4", "--pretrained-weights", "bsf:brats-pretrain")
    assert rc == 0, err
    path = calls[0]["pretrained_weights"]
    assert path.startswith(hub["cache"]) and resolve_checkpoint(path).entry.name == "brats-pretrain"
    rc, _, err = _cli(capsys, "lowdata", "run", "-d", "4", "--pretrained-weights", "bsf:brats-pretrain", "--dry-run")
    assert rc == 0 and calls[1]["pretrained_weights"] == "bsf:brats-pretrain", err  # printed as given


def test_safetensors_come_with_their_metadata(hub, capsys):
    """An exported model (``export --to hub``: model.safetensors + bsf_model.json) pulled by hf:// name loads with
    the channels of its metadata file, fetched from the same commit into the same cache folder."""
    from safetensors.torch import save

    from bsf_nnunet.weights.hub import resolve_checkpoint

    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in BSFSwinUNETR(1, 2, **TOY).state_dict().items()}
    hub["files"]["sub/model.safetensors"] = save(sd)
    hub["files"]["sub/bsf_model.json"] = json.dumps({"channel_names": ["T1w"], "merging": "legacy",
                                                     "axis_order": "zyx"}).encode()
    rc, out, err = _cli(capsys, "weights", "pull", f"hf://{REPO}/sub/model.safetensors")
    assert rc == 0, err
    path = out.strip()
    assert os.path.isfile(os.path.join(os.path.dirname(path), "bsf_model.json"))
    resolved = resolve_checkpoint(path)
    assert resolved.entry is None and resolved.source == f"hf://{REPO}@{COMMIT}/sub/model.safetensors"
    assert resolved.load().metadata["channel_names"] == ["T1w"]


def test_push_dry_run_and_refusals(tmp_path, capsys):
    folder = tmp_path / "export"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref")
    (folder / "README.md").write_text("---\nlicense: other\n---\n# model\n")
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (folder / "bsf_model.json").write_text("{}")
    rc, out, err = _cli(capsys, "weights", "push", str(folder), "me/my-model", "--dry-run")
    assert rc == 0, err
    assert "1,000  model.safetensors" in out and "README.md" in out and "bsf_model.json" in out and ".git" not in out
    assert "Would upload 3 files" in out and "nothing was uploaded" in out
    (folder / "model.safetensors").unlink()
    rc, _, err = _cli(capsys, "weights", "push", str(folder), "me/my-model", "--dry-run")
    assert rc == 2 and "no weights" in err
    (folder / "README.md").unlink()
    rc, _, err = _cli(capsys, "weights", "push", str(folder), "me/my-model")
    assert rc == 2 and "README.md" in err and "nothing was uploaded" in err


def test_import_model_by_published_name(hub, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    rc, out, err = _cli(capsys, "import-model", "bsf:brats-finetune", "-d", "137")
    assert rc == 0, err
    folder = tmp_path / "results" / "Dataset137_Imported" / "BSFTrainer_imported__BSFImportedPlans__3d_fullres"
    assert "nnUNetv2_predict" in out and "-step_size 0.4" in out
    info = json.loads((folder / "IMPORTED_FROM.json").read_text())
    assert info["published"] == "bsf:brats-finetune" and info["channels"] == ["FLAIR", "T1ce", "T1", "T2"]
    assert info["regions"] == "brats" and info["merging"] == "legacy" and info["axis_order"] == "xyz"
    assert info["checkpoint"] == f"hf://{REPO}@{COMMIT}/model_weights_BRATS-finetune.pt"
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "FLAIR", "1": "T1ce", "2": "T1", "3": "T2"} and "regions_class_order" in ds
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["axis_order"] == "xyz"
    ck = torch.load(folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["bsf_metadata"]["source"] == info["checkpoint"] and ck["bsf_metadata"]["merging"] == "legacy"
    # explicit flags are checked against the table; other files still need --channels
    rc, _, err = _cli(capsys, "import-model", "bsf:brats-finetune", "-d", "138", "--channels", "T1,T1ce,T2,FLAIR")
    assert rc == 2 and "contradicts bsf:brats-finetune" in err
    plain = tmp_path / "model.pt"
    plain.write_bytes(hub["files"]["model_weights_BRATS-finetune.pt"])
    rc, _, err = _cli(capsys, "import-model", str(plain), "-d", "139")
    assert rc == 2 and "--channels" in err


def test_pretrained_weights_by_published_name_in_nnunetv2_train(hub, nnunet_env, prepared, run):
    """The one real training: -pretrained_weights bsf:brats-pretrain, downloaded inside nnUNetv2_train, no
    BSF_PRETRAINED_CHANNELS: the table's channel order (FLAIR, T1ce, T1, T2) is mapped onto the dataset's (nnU-Net's
    BraTS order T1, T1ce, T2, FLAIR) by name, and the table's axis order is recorded for nnUNetv2_predict."""
    dataset_id, full, _ = prepared("brats4")
    env = {k: v for k, v in nnunet_env.items() if k not in ("BSF_PRETRAINED_CHANNELS", "HF_TOKEN")}
    env.update(hub["env"])
    out = run(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", "BSFTrainer_CIfast", "-device", "cpu",
               "-pretrained_weights", "bsf:brats-pretrain"], env)
    assert "Please cite: Cox" in out  # the licence notice, once
    res = os.path.join(env["nnUNet_results"], full, "BSFTrainer_CIfast__nnUNetPlans__3d_fullres")
    log = open(glob.glob(os.path.join(res, "fold_0", "training_log_*.txt"))[0]).read()
    assert "Initialised from bsf:brats-pretrain" in log and "from the published-weights table" in log
    for line in ("model channel 0 'T1' <- checkpoint channel 2 'T1'", "model channel 1 'T1ce' <- checkpoint channel "
                 "1 'T1ce'", "model channel 2 'T2' <- checkpoint channel 3 'T2'",
                 "model channel 3 'FLAIR' <- checkpoint channel 0 'FLAIR'"):
        assert line in log, log[-3000:]
    plans = json.load(open(os.path.join(res, "plans.json")))
    assert plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["axis_order"] == "xyz"
    assert len(_gets(hub, "model_weights_BRATS-pretrain.pt")) == 1
