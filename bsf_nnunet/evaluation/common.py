"""Folder-level evaluation: match predictions to ground truth by file name, evaluate cases in parallel, write a
CSV per case and a JSON summary (both atomically)."""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets.convert import nifti_stem
from ..datasets.parallel import parallel_imap
from ..errors import BSFError
from ..io import atomic_write_json, atomic_write_text


class EvaluationError(BSFError, ValueError):
    """Bad input for an evaluation; the message names the file and says what to do."""


class CaseError(Exception):
    """A problem with one case (reported; the other cases are evaluated)."""


def nifti_files(folder: str) -> Dict[str, str]:
    """{case name: path} for the NIfTI files directly in ``folder``."""
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            stem = nifti_stem(e.name)
            if stem is not None and not e.is_dir():
                if stem in out:
                    raise EvaluationError(f"{folder} holds both {os.path.basename(out[stem])} and {e.name}; keep one.")
                out[stem] = e.path
    return out


def match_cases(pred_dir: str, gt: Dict[str, str]) -> Tuple[List[Tuple[str, str, str]], List[str], List[str]]:
    """(pairs (case, pred, gt), missing predictions, predictions without ground truth)."""
    if not os.path.isdir(pred_dir):
        raise EvaluationError(f"prediction folder {pred_dir} does not exist; check the path.")
    preds = nifti_files(pred_dir)
    if not preds:
        raise EvaluationError(f"no NIfTI files (.nii.gz/.nii) in the prediction folder {pred_dir}.")
    pairs = [(c, preds[c], gt[c]) for c in sorted(gt) if c in preds]
    missing = sorted(c for c in gt if c not in preds)
    extra = sorted(c for c in preds if c not in gt)
    if not pairs:
        raise EvaluationError(f"no prediction in {pred_dir} has a ground-truth file of the same name (e.g. "
                              f"prediction {sorted(preds)[0]!r}, ground truth {sorted(gt)[0]!r}); the files are "
                              f"matched by file name.")
    return pairs, missing, extra


def load(path: str, what: str):
    """(array, spacing per array axis, affine) read with nibabel; NaN/Inf is an error."""
    import nibabel as nib
    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
    except Exception as e:
        raise CaseError(f"cannot read {what} {path}: {e}") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise CaseError(f"{what} {path} has shape {arr.shape}; a 3D label map is expected")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise CaseError(f"{what} {path} has NaN/Inf voxels")
    return arr, tuple(float(z) for z in img.header.get_zooms()[:3]), img.affine


def check_same_grid(pred, gt, pred_path, gt_path) -> None:
    (pa, ps, _), (ga, gs, _) = pred, gt
    if pa.shape != ga.shape:
        raise CaseError(f"prediction {pred_path} has shape {pa.shape}, ground truth {gt_path} {ga.shape}; "
                        f"predict on the original images (nnUNetv2_predict resamples back to them)")
    if not np.allclose(ps, gs, rtol=0, atol=1e-3):
        raise CaseError(f"voxel spacing of prediction {pred_path} {ps} differs from ground truth {gs}")


def _mean(vals):
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def evaluate_folder(pred_dir: str, gt: Dict[str, str], case_fn: Callable, metric_names: Sequence[str], task: str,
                    output_dir: Optional[str] = None, num_workers: int = 1, extra_summary: Optional[dict] = None,
                    job_args: tuple = ()) -> dict:
    """Evaluate all matched cases; ``case_fn((case, pred, gt, *job_args))`` returns a dict of metrics or raises
    CaseError. Writes ``<task>_metrics.csv`` and ``<task>_summary.json`` into ``output_dir`` (default pred_dir)."""
    pairs, missing, extra = match_cases(pred_dir, gt)
    rows, failed = [], []
    for res in parallel_imap(case_fn, [(c, p, g) + tuple(job_args) for c, p, g in pairs], num_workers):
        if "error" in res:
            failed.append({"case": res["case"], "reason": res["error"]})
        else:
            rows.append(res)
    rows.sort(key=lambda r: r["case"])
    failed.sort(key=lambda r: r["case"])
    output_dir = output_dir or pred_dir
    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, f"{task}_metrics.csv")
    json_path = os.path.join(output_dir, f"{task}_summary.json")
    cols = ["case"] + list(metric_names)
    extra_cols = sorted({k for r in rows for k in r} - set(cols))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols + extra_cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(csv_path, buf.getvalue())
    summary = {
        "task": task, "prediction_folder": os.path.abspath(pred_dir), "n_cases": len(rows),
        "mean": {m: _mean(r[m] for r in rows) for m in metric_names},
        "median": {m: (float(np.median([r[m] for r in rows])) if rows else None) for m in metric_names},
        "missing_predictions": missing, "predictions_without_ground_truth": extra, "failed": failed,
    }
    summary.update(extra_summary or {})
    summary["cases"] = rows
    atomic_write_json(json_path, summary)
    summary["csv"], summary["json"] = csv_path, json_path
    _print(summary, metric_names)
    return summary


def _print(summary: dict, metric_names: Sequence[str]) -> None:
    print(f"{summary['task']}: {summary['n_cases']} case(s) evaluated")
    for m in metric_names:
        v = summary["mean"][m]
        print(f"  mean {m:<20s} {'n/a' if v is None else f'{v:.4f}'}")
    if summary["missing_predictions"]:
        ms = summary["missing_predictions"]
        print(f"missing predictions ({len(ms)}), not in the means: {', '.join(ms[:20])}"
              f"{' ...' if len(ms) > 20 else ''}", file=sys.stderr)
    if summary["predictions_without_ground_truth"]:
        ex = summary["predictions_without_ground_truth"]
        print(f"predictions without ground truth ({len(ex)}), ignored: {', '.join(ex[:20])}"
              f"{' ...' if len(ex) > 20 else ''}", file=sys.stderr)
    for f in summary["failed"]:
        print(f"FAILED {f['case']}: {f['reason']}", file=sys.stderr)
    print(f"wrote {summary['csv']} and {summary['json']}")


def run_guarded(fn: Callable, job: tuple) -> dict:
    """``fn(job)``, with a CaseError (or any error) turned into {'case', 'error'}: one case never stops the others.
    (Call it from a module-level function, which the process pool can pickle.)"""
    try:
        return fn(job)
    except CaseError as e:
        return {"case": job[0], "error": str(e)}
    except Exception as e:
        return {"case": job[0], "error": f"{type(e).__name__}: {e}"}
