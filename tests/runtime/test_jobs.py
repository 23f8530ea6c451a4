"""A run's plan: which cases of a folder run, which are skipped and which are refused; no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flareseg.errors import FlareSegError
from flareseg.runtime import jobs
from flareseg.runtime.jobs import CaseJob, input_case_name, part_of, plan_folder


def _done(path):
    """A finished result at ``path``: a small label map, as the plan reads its header and size."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), path)


def _cts(folder, n):
    """``c0_0000.nii.gz``... in ``folder``: not images (a done case's check of its input leaves those to the run)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"c{i}_0000.nii.gz" for i in range(n)]
    for p in paths:
        p.write_bytes(b"a CT, not read by the plan")
    return paths


def _inputs(tmp_path):
    folder = tmp_path / "in"
    paths = _cts(folder, 4)
    empty_series = folder / "series"
    empty_series.mkdir()  # a folder input without DICOM files: its name cannot be read
    return [*paths, empty_series]


def test_the_plan_runs_skips_and_refuses_each_case_in_order(tmp_path):
    inputs, out = _inputs(tmp_path), tmp_path / "out"
    out.mkdir()
    _done(out / "c1.nii.gz")  # finished: skipped
    (out / "c2.nii.gz").mkdir()  # a folder where the output goes: not done, and refused
    plan = list(plan_folder(inputs, out))
    assert [(p.case, p.status) for p in plan] == [
        ("c0", "run"),
        ("c1", "skipped"),
        ("c2", "failed"),
        ("c3", "run"),
        ("series", "failed"),
    ]
    assert plan[0].job == CaseJob("c0", inputs[0], out / "c0.nii.gz", replace=False)  # another run's result is kept
    assert str(plan[2].error) == f"{out / 'c2.nii.gz'}: a folder is in the way of the output"
    assert str(plan[4].error) == f"{inputs[4]}: no DICOM files" and plan[4].output is None
    again = list(plan_folder(inputs, out, overwrite=True))
    assert [p.status for p in again] == ["run", "run", "failed", "run", "failed"]
    with pytest.raises(FlareSegError, match="c1 is skipped, not run"):
        _ = plan[1].job
    seg = list(plan_folder(inputs[:1], out, "dicom-seg"))
    assert seg[0].status == "failed" and "DICOM SEG output needs a DICOM series" in str(seg[0].error)


def test_the_plan_is_lazy_so_the_first_case_to_run_is_found_at_once(tmp_path, monkeypatch):
    inputs, out = _inputs(tmp_path), tmp_path / "out"
    named: list[str] = []
    real = jobs.input_case_name
    monkeypatch.setattr(jobs, "input_case_name", lambda p: named.append(p.name) or real(p))
    first = next(p for p in plan_folder(inputs, out) if p.status == "run")
    assert first.input == inputs[0] and named == ["c0_0000.nii.gz"]


def test_a_folder_of_cases_probes_its_output_folder_once(tmp_path, monkeypatch):
    inputs, out = _inputs(tmp_path), tmp_path / "out"
    probed: list[str] = []
    real = jobs.check_writable
    monkeypatch.setattr(jobs, "check_writable", lambda path: probed.append(path.name) or real(path))
    monkeypatch.setattr(jobs, "check_writable_folder", lambda path: probed.append(path.name) or real(path))
    plan = list(plan_folder(inputs, out))
    assert [p.status for p in plan] == ["run", "run", "run", "run", "failed"]
    assert probed == ["out"]  # each probe creates and removes a file: one per folder, not one per case


def test_planning_imports_no_torch():
    code = "import sys, flareseg.runtime.jobs; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_timings_and_output_folders_that_would_destroy_or_fail_are_refused(tmp_path):
    from flareseg.runtime.jobs import check_output_folder, check_timings

    inputs = _inputs(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "at-all")
    refused = {
        tmp_path / "t.nii.gz": "the timings file must end in .json",
        tmp_path / "afile" / "t.json": f"cannot create its folder, {tmp_path / 'afile'} is a file",
        tmp_path / "in": "must end in .json",
    }
    for path, message in refused.items():
        with pytest.raises(FlareSegError, match=message):
            check_timings(path, inputs)
    renamed = tmp_path / "in" / "c0.json"
    renamed.write_text("{}")
    with pytest.raises(FlareSegError, match="refusing to overwrite an input"):
        check_timings(renamed, [*inputs, renamed])
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(FlareSegError, match="a folder is in the way"):
        check_timings(tmp_path / "dir.json", inputs)
    check_timings(tmp_path / "new" / "timings.json", inputs)  # a folder still to be made is fine
    folders = {
        tmp_path / "in": "the output folder is the input folder",
        tmp_path / "afile": "the output must be a folder",
        tmp_path / "afile" / "sub": "is a file",
        tmp_path / "dangling": "a broken symbolic link is in the way",
    }
    for out, message in folders.items():
        with pytest.raises(FlareSegError, match=message):
            check_output_folder(out, tmp_path / "in")
    check_output_folder(tmp_path / "in" / "pred", tmp_path / "in")  # inside the input folder is fine


def test_an_unreadable_series_or_nameless_file_fails_alone_and_the_others_run(tmp_path):
    from flareseg.runtime.jobs import list_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "b_0000.nii.gz").write_bytes(b"not read by the plan")
    (folder / "_0000.nii.gz").write_bytes(b"no case name")
    (folder / "aaa").mkdir()
    (folder / "aaa" / "bad.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00ZZ\x04\x00abcd" * 4)
    listed = list_inputs(folder)
    assert listed["aaa/"] == folder / "aaa"  # listed under its folder's name: its reader says what is wrong
    plan = {p.input.name: p for p in plan_folder(list(listed.values()), tmp_path / "out")}
    assert plan["b_0000.nii.gz"].status == "run"
    assert plan["aaa"].status == "failed" and "unreadable DICOM file bad.dcm" in str(plan["aaa"].error)
    assert plan["_0000.nii.gz"].status == "failed" and "no case name" in str(plan["_0000.nii.gz"].error)


def test_a_broken_link_anywhere_on_the_way_is_refused_and_the_output_folder_is_not_an_input(tmp_path):
    from dicom_series import phantom, write_series

    from flareseg.runtime.jobs import check_output_folder, check_timings, list_cases

    (tmp_path / "dang").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FlareSegError, match="a broken symbolic link is in the way"):
        check_output_folder(tmp_path / "dang" / "out")
    with pytest.raises(FlareSegError, match="a broken symbolic link is in the way"):
        check_timings(tmp_path / "dang" / "t.json", [])
    folder = tmp_path / "in"
    write_series(folder / "ct", phantom(), patient_id="P", series_number=3)
    write_series(folder / "segs", phantom(), patient_id="P", series_number=901)  # as DICOM SEG outputs would be
    assert list_cases(folder) == [folder / "ct", folder / "segs"]
    assert list_cases(folder, exclude=folder / "segs") == [folder / "ct"]


def test_a_series_output_may_not_join_its_input_series(tmp_path):
    from flareseg.runtime.jobs import check_output

    series = tmp_path / "series"
    series.mkdir()
    for output_type, name in (("dicom-seg", "PAT_s3.dcm"), ("nifti", "PAT_s3.nii.gz")):
        with pytest.raises(FlareSegError, match="would join the input series"):
            check_output(CaseJob("PAT_s3", series, series / name, output_type))
        with pytest.raises(FlareSegError, match="would join the input series"):
            check_output(CaseJob("PAT_s3", series, series / "." / name, output_type))
        check_output(CaseJob("PAT_s3", series, tmp_path / "out" / name, output_type))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # nothing written by the checks


def test_two_inputs_of_one_case_name_run_once_and_the_second_fails(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x_0000.nii.gz").write_bytes(b"not read by the plan")
    first, second = tmp_path / "a" / "x_0000.nii.gz", tmp_path / "b" / "x_0000.nii.gz"
    plan = list(plan_folder([first, second, tmp_path / "a" / "x_0000.nii.gz"], tmp_path / "out"))
    assert [p.status for p in plan] == ["run", "failed", "failed"]
    assert str(plan[1].error) == (f"{second}: case x again (first from {first}); its output would replace that one's")
    _done(tmp_path / "out" / "x.nii.gz")
    assert [p.status for p in plan_folder([first, second], tmp_path / "out")] == ["skipped", "failed"]


def test_a_timings_path_holding_another_file_is_refused_and_earlier_timings_are_replaceable(tmp_path):
    from flareseg.runtime.jobs import check_timings

    sidecar = tmp_path / "flareseg_fp32.onnx.json"
    sidecar.write_text('{"format": "flareseg-onnx", "precision": "fp32"}')
    for path in (sidecar, tmp_path / "notes.json"):
        path.write_text(path.read_text() if path.exists() else "not JSON")
        with pytest.raises(FlareSegError, match="exists and is not a flare-infer timings file"):
            check_timings(path, [])
    earlier = tmp_path / "timings.json"
    earlier.write_text('{"context": {"model": "m.pt"}, "cases": []}')
    check_timings(earlier, [])
    cases = [
        {"case": f"case_{i:04d}", "read_s": 0.1, "total_s": 1.0, "output": f"pred/{i:04d}.nii.gz"} for i in range(500)
    ]
    earlier.write_text(json.dumps({"context": {"model": "m.pt"}, "cases": cases}))  # a run of 500 cases
    check_timings(earlier, [])
    with open(earlier, "r+b") as f:  # beyond any run's timings: not read
        f.truncate(64 * 2**20 + 1)
    with pytest.raises(FlareSegError, match="exists and is not a flare-infer timings file"):
        check_timings(earlier, [])
    made = tmp_path / "made-by-mktemp.json"
    made.touch()
    check_timings(made, [])  # an empty file is there to be written
    assert sidecar.read_text() == '{"format": "flareseg-onnx", "precision": "fp32"}'


def test_an_output_folder_inside_an_input_series_or_named_like_a_file_is_refused(tmp_path):
    from dicom_series import phantom, write_series

    from flareseg.runtime.jobs import check_output, check_output_folder

    folder = tmp_path / "in"
    write_series(folder / "s1", phantom(), patient_id="P", series_number=1)
    write_series(folder / "s2", phantom(), patient_id="P", series_number=2)
    for out in (folder / "s2", folder / "s2" / "pred"):  # the run would leave s2 out, and SEG files would spoil it
        with pytest.raises(FlareSegError, match=rf"inside the input series {folder / 's2'}, which the run would then"):
            check_output_folder(out, folder)
    check_output_folder(folder / "pred", folder)  # beside the series: excluded from the listing, as before
    for name in ("pred.nii.gz", "pred.NII", "segs.dcm"):
        with pytest.raises(FlareSegError, match="the output must be a folder, not a name of a file"):
            check_output_folder(tmp_path / name, folder)
    # A DICOM SEG written into another image series' folder would spoil that series too; a results folder is fine.
    with pytest.raises(FlareSegError, match=rf"^{folder / 's2'}: DICOM SEG output here would join the DICOM series"):
        check_output(CaseJob("P_s1", folder / "s1", folder / "s2" / "P_s1.dcm", "dicom-seg"))
    with pytest.raises(FlareSegError, match="DICOM SEG output here would join the DICOM series in it"):
        list(plan_folder([folder / "s1"], folder / "s2", "dicom-seg"))  # checked once for the folder's cases
    # A NIfTI label map too: beside DICOM files it would make s2 neither one series nor a folder of cases.
    with pytest.raises(FlareSegError, match=rf"^{folder / 's2'}: a NIfTI label map here would join the DICOM series"):
        check_output(CaseJob("P_s1", folder / "s1", folder / "s2" / "P_s1.nii.gz"))
    with pytest.raises(FlareSegError, match="a NIfTI label map here would join the DICOM series in it"):
        list(plan_folder([folder / "s1"], folder / "s2", "nifti"))
    assert not (tmp_path / "pred.nii.gz").exists() and not (folder / "pred").exists()


def test_follow_up_studies_get_names_of_their_own_and_a_same_day_clash_fails_alone(tmp_path):
    from dicom_series import phantom, write_series

    from flareseg.runtime.jobs import list_cases

    def dated(day):
        return lambda i, ds: setattr(ds, "StudyDate", day)

    folder = tmp_path / "in"
    write_series(folder / "first", phantom(), patient_id="P", series_number=1)  # studied 20260101
    write_series(folder / "later", phantom(), patient_id="P", series_number=1, edit=dated("20270315"))
    write_series(folder / "again", phantom(), patient_id="P", series_number=1)  # the same day and number
    write_series(folder / "undated", phantom(), patient_id="P", series_number=1, edit=dated(""))
    plan = list(plan_folder(list_cases(folder), tmp_path / "out"))
    assert {p.input.name: (p.case, p.status) for p in plan} == {
        "again": ("P_20260101_s1", "run"),
        "first": ("P_20260101_s1", "failed"),  # the others still run
        "later": ("P_20270315_s1", "run"),
        "undated": ("P_s1", "run"),
    }
    (failed,) = [p for p in plan if p.status == "failed"]
    assert str(failed.error) == (
        f"{folder / 'first'}: case P_20260101_s1 again (first from {folder / 'again'}); its output would replace "
        "that one's"
    )


def test_a_dcm_output_without_the_dicom_seg_type_says_which_option_to_add(tmp_path):
    from flareseg.runtime.jobs import check_output

    ct = tmp_path / "c_0000.nii.gz"
    with pytest.raises(
        FlareSegError, match=r"seg\.dcm: output must end in \.nii\.gz or \.nii \(for DICOM SEG output add "
    ):
        check_output(CaseJob("c", ct, tmp_path / "seg.dcm"))
    with pytest.raises(FlareSegError, match=r"seg\.txt: output must end in \.nii\.gz or \.nii$"):
        check_output(CaseJob("c", ct, tmp_path / "seg.txt"))


def test_a_series_clash_stays_in_one_part_so_that_part_fails_it(tmp_path):
    from dicom_series import phantom, write_series

    from flareseg.runtime.jobs import list_cases

    folder = tmp_path / "in"
    for sub, number in (("a", 1), ("b", 1), ("c", 2), ("d", 3)):  # a and b: one name
        write_series(folder / sub, phantom(), patient_id="P", series_number=number)
    names = {sub: input_case_name(folder / sub) for sub in "abcd"}
    assert names["a"] == names["b"] and len(set(names.values())) == 3
    for k in (2, 3, 5):
        parts = [list_cases(folder, num_parts=k, part_id=i) for i in range(k)]
        assert sorted(p for part in parts for p in part) == [folder / sub for sub in "abcd"]  # each in one part
        for sub in "abcd":
            assert folder / sub in parts[part_of(names[sub], k)]
        holder = parts[part_of(names["a"], k)]
        plan = {p.input.name: p.status for p in plan_folder(holder, tmp_path / "out")}
        assert (plan["a"], plan["b"]) == ("run", "failed")  # the part with both names fails the second


def test_a_case_s_part_depends_on_its_name_alone_not_on_what_else_the_folder_holds(tmp_path):
    # Parts started while cases arrive each list a different folder: by position in the listing, a case
    # arriving between two starts shifted the later ones, and some cases ran in no part, each part exiting 0.
    from flareseg.runtime.jobs import list_cases

    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"case_{i:03d}" for i in range(40)]
    for name in names[1:]:
        (folder / f"{name}_0000.nii.gz").write_bytes(b"")
    first = list_cases(folder, num_parts=2, part_id=0)  # part 0 starts before case_000 arrives
    (folder / "case_000_0000.nii.gz").write_bytes(b"")
    second = list_cases(folder, num_parts=2, part_id=1)
    assert part_of("case_000", 2) == 1  # so the part that listed it after it came runs it
    assert sorted(p.name for p in first + second) == [f"{name}_0000.nii.gz" for name in names]  # each once
    # The same parts on every machine, Python and flareseg version (CRC-32 of the name), so mixed runs agree.
    assert [part_of(f"case_{i:03d}", 2) for i in range(6)] == [1, 1, 1, 1, 0, 0]
    assert [part_of(f"case_{i:03d}", 3) for i in range(6)] == [0, 2, 2, 2, 1, 0]


def test_a_results_folder_of_dicom_seg_inside_the_input_folder_takes_more_results(tmp_path):
    import numpy as np
    from dicom_series import phantom, write_series

    from flareseg.dicom import read_series, write_seg
    from flareseg.runtime.jobs import check_output_folder

    folder = tmp_path / "in"
    write_series(folder / "s1", phantom(), patient_id="P", series_number=1)
    volume = read_series(folder / "s1")
    write_seg(np.zeros(volume.array.shape, np.uint8), volume, folder / "results" / "P_20260101_s1.dcm")
    check_output_folder(folder / "results", folder)  # an earlier run's SEG files: not an input series
    plan = list(plan_folder([folder / "s1"], folder / "results", "dicom-seg"))
    assert [(p.case, p.status) for p in plan] == [("P_20260101_s1", "skipped")]


def test_a_result_named_beside_its_input_fails_alone_and_the_input_runs(tmp_path):
    from flareseg.runtime.jobs import list_cases
    from flareseg.volume import find_cases

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("ct_0000.nii.gz", "ct.nii.gz", "b_0000.nii.gz"):  # ct.nii.gz: `-o in/ct.nii.gz` of an earlier run
        (folder / name).write_bytes(b"not read by the plan")
    plan = list(plan_folder(list_cases(folder), tmp_path / "out"))
    assert [(p.input.name, p.case, p.status) for p in plan] == [
        ("b_0000.nii.gz", "b", "run"),
        ("ct_0000.nii.gz", "ct", "run"),  # the file with the channel tag is the case's input
        ("ct.nii.gz", "ct", "failed"),
    ]
    assert str(plan[2].error).startswith(f"{folder / 'ct.nii.gz'}: case ct again (first from {folder / 'ct_0000'}")
    with pytest.raises(FlareSegError, match=r"case ct appears twice \(ct.nii.gz, ct_0000.nii.gz\)"):
        find_cases(folder)  # flare-eval and training still refuse such a folder: which file is meant is unclear


def test_an_output_that_leads_to_another_input_of_the_run_is_refused_even_with_overwrite(tmp_path):
    # A link in the output folder to another case's CT: the writer would follow it and replace that CT.
    cts = _cts(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "c1.nii.gz").symlink_to(cts[2])
    (out / "c0.nii.gz").hardlink_to(cts[0])  # its own input, another name for the same file
    plan = {p.case: p for p in plan_folder(cts, out, overwrite=True)}
    assert plan["c1"].status == "failed"
    assert (
        str(plan["c1"].error)
        == f"{out / 'c1.nii.gz'}: refusing to overwrite the input {cts[2]} (the output leads to it)"
    )
    assert plan["c0"].status == "failed" and "refusing to overwrite the input" in str(plan["c0"].error)
    assert plan["c2"].status == "run"
    # Without --overwrite they are kept, and not taken for results: a link to another case's CT is none.
    kept = {p.case: p for p in plan_folder(cts, out)}
    assert [kept[c].status for c in ("c0", "c1", "c2")] == ["failed", "failed", "run"]
    assert str(kept["c1"].error) == str(plan["c1"].error)
    assert cts[2].read_bytes() == b"a CT, not read by the plan"


def test_a_folder_of_dicom_files_and_nifti_images_side_by_side_is_refused_naming_both(tmp_path):
    # Taken for one series, its NIfTI cases were left out without a word.
    from dicom_series import phantom, write_series

    folder = tmp_path / "TestImg"
    write_series(folder, phantom(), patient_id="P")
    assert jobs.is_series_input(folder)
    for i in range(4):
        (folder / f"case_{i}_0000.nii.gz").write_bytes(b"a CT")
    with pytest.raises(
        FlareSegError,
        match=r"TestImg: holds DICOM files and NIfTI images \(case_0_0000\.nii\.gz, "
        r"case_1_0000\.nii\.gz, case_2_0000\.nii\.gz and 1 more\) side by side",
    ):
        jobs.is_series_input(folder)
    # NIfTI names that sort before the DICOM files (more of them than the probe reads) do not hide them.
    for i in range(10):
        (folder / f"0case_{i}_0000.nii.gz").write_bytes(b"a CT")
    with pytest.raises(FlareSegError, match="give a NIfTI file itself as the input, or move the DICOM files"):
        jobs.is_series_input(folder)


def test_a_stray_slice_beside_series_folders_is_refused_not_taken_for_a_series_of_one(tmp_path):
    # One DICOM file copied to the top of a folder of series made the whole run one case of one slice.
    import shutil

    from dicom_series import phantom, write_series

    folder = tmp_path / "series"
    write_series(folder / "a", phantom(), patient_id="A")
    files = write_series(folder / "b", phantom(), patient_id="B")
    assert not jobs.is_series_input(folder)
    shutil.copy(files[0], folder / "stray.dcm")
    with pytest.raises(FlareSegError) as info:
        jobs.is_series_input(folder)
    assert str(info.value) == (
        f"{folder}: holds DICOM files and series folders (a, b) side by side, so it is neither one series nor a "
        "folder of cases: give a NIfTI file itself as the input, or move the DICOM files into a subfolder of their "
        "own (a series per subfolder)"
    )
    # A DICOMDIR under another name at the top is no slice: the folder is a folder of series.
    (folder / "stray.dcm").unlink()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    index = Dataset()
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.save_as(folder / "DICOMDIR.dcm", enforce_file_format=True)
    assert not jobs.is_series_input(folder)
    shutil.copy(files[0], folder / "stray.dcm")
    shutil.rmtree(folder / "a")
    shutil.rmtree(folder / "b")
    (folder / "results").mkdir()  # a folder without a series beside the files: the files are one series
    assert jobs.is_series_input(folder)
    # A hidden copy of a series (a file system's .snapshot) is no series folder beside the files either.
    write_series(folder / ".snapshot", phantom(), patient_id="A")
    assert jobs.is_series_input(folder)


def test_a_nifti_case_and_a_series_of_the_same_name_are_refused_naming_both(tmp_path):
    """Either one left out would be a case gone missing without a word."""
    import nibabel as nib
    import numpy as np
    from dicom_series import phantom, write_series

    folder = tmp_path / "in"
    write_series(folder / "s1", phantom(), patient_id="PAT01")
    name = input_case_name(folder / "s1")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), folder / f"{name}_0000.nii.gz")
    with pytest.raises(FlareSegError) as info:
        jobs.list_inputs(folder)
    assert str(info.value).startswith(f"{folder}: case {name} appears twice ({name}_0000.nii.gz, s1/)")


def test_a_result_names_its_model_only_in_flareseg_s_own_words(tmp_path):
    """Another tool's description that happens to hold a sha256 is no flareseg stamp: the result is not ours."""
    import nibabel as nib
    import numpy as np

    from flareseg.provenance import PLAIN_DESCRIPTION

    image = nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4))
    said = {
        "flareseg 0.1.0 sha256:0123456789abcdef model.pt": ("0123456789abcdef", "model.pt"),
        "nnunet 2.1 sha256:0123456789abcdef model.pth": None,
        "flareseg 0.1.0 sha256:0123 model.pt": None,
        PLAIN_DESCRIPTION: (None, None),
    }
    for i, (description, made_by) in enumerate(said.items()):
        image.header["descrip"] = description.encode()
        nib.save(image, tmp_path / f"r{i}.nii.gz")
        assert jobs.result_model(tmp_path / f"r{i}.nii.gz", "nifti") == made_by, description


def test_same_file_sees_through_links_and_other_names_of_one_file(tmp_path):
    a = tmp_path / "a.nii.gz"
    a.write_bytes(b"x")
    (tmp_path / "link.nii.gz").symlink_to(a)
    (tmp_path / "hard.nii.gz").hardlink_to(a)  # as a second mount of the folder would show it: one inode
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    assert jobs.same_file(tmp_path / "link.nii.gz", a) and jobs.same_file(tmp_path / "hard.nii.gz", a)
    assert not jobs.same_file(tmp_path / "b.nii.gz", a) and not jobs.same_file(tmp_path / "none.nii.gz", a)


def test_a_file_at_an_output_that_is_no_result_fails_its_case_instead_of_passing_for_done(tmp_path):
    import gzip

    import nibabel as nib
    import numpy as np

    cts = _cts(tmp_path / "in", 7)[:5]
    out = tmp_path / "out"
    out.mkdir()
    labels = nib.Nifti1Image(np.random.default_rng(0).integers(0, 5, (40, 40, 20)).astype(np.uint8), np.eye(4))
    nib.save(labels, out / "c0.nii.gz")  # a finished result
    whole = (out / "c0.nii.gz").read_bytes()
    (out / "c1.nii.gz").write_bytes(b"")  # a placeholder
    (out / "c2.nii.gz").write_bytes(whole[:500])  # a copy cut short
    (out / "c3.nii.gz").write_bytes(b"not a label map at all")
    raw = gzip.decompress(whole)
    # Valid results that other writers make: several gzip members, zero padding after the stream.
    cts += [tmp_path / "in" / f"c{i}_0000.nii.gz" for i in (5, 6)]
    (out / "c5.nii.gz").write_bytes(gzip.compress(raw[:2000]) + gzip.compress(raw[2000:]))
    (out / "c6.nii.gz").write_bytes(whole + bytes(64))
    plan = {p.case: p for p in plan_folder(cts, out)}
    statuses = [plan[c].status for c in ("c0", "c1", "c2", "c3", "c4", "c5", "c6")]
    assert statuses == ["skipped", "failed", "failed", "failed", "run", "skipped", "skipped"]
    assert str(plan["c1"].error) == f"{out / 'c1.nii.gz'}: exists but is empty; remove it to redo the case"
    assert "exists but is cut short" in str(plan["c2"].error)
    assert "exists but is not a readable result" in str(plan["c3"].error)
    assert (out / "c1.nii.gz").read_bytes() == b""  # nothing of theirs is touched


def test_an_uncompressed_result_is_done_at_exactly_its_size_and_unfinished_one_byte_short(tmp_path):
    import nibabel as nib
    import numpy as np

    from flareseg.runtime.jobs import unfinished_result

    out = tmp_path / "c.nii"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.uint8), np.eye(4)), out)
    assert out.stat().st_size == 352 + 120  # the header and offset, then the voxels: nothing after them
    assert unfinished_result(out, "nifti") is None
    out.write_bytes(out.read_bytes()[:-1])
    assert unfinished_result(out, "nifti") == "holds 471 bytes where its header needs 472 (cut short?)"


@pytest.mark.parametrize("dims", [(2**21, 2**21, 2**21), (2**40, 2**40, 8), (4, 4, 4 + 2**62)])
def test_a_result_whose_nifti2_grid_passes_int64_is_unfinished(tmp_path, dims):
    # The grid's byte count wrapped in int64 (to 0, negative, or 64): a damaged output was judged finished and kept.
    import nibabel as nib
    import numpy as np

    from flareseg.runtime.jobs import unfinished_result

    raw = bytearray(nib.Nifti2Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)).to_bytes())
    raw[24:48] = np.array(dims, "<i8").tobytes()  # dim[1..3]
    out = tmp_path / "c.nii"
    out.write_bytes(bytes(raw))
    needed = 544 + dims[0] * dims[1] * dims[2]
    assert unfinished_result(out, "nifti") == f"holds {len(raw):,} bytes where its header needs {needed:,} (cut short?)"


def test_a_case_written_onto_its_own_input_is_refused_before_any_work(tmp_path):
    from flareseg.runtime.jobs import file_job

    (ct,) = _cts(tmp_path / "in", 1)
    with pytest.raises(FlareSegError, match=r"refusing to overwrite the input$"):
        file_job(ct, ct)
    with pytest.raises(FlareSegError, match=r"refusing to overwrite the input$"):
        file_job(ct, tmp_path / "in" / ".." / "in" / ct.name)  # another name of the same file


def test_a_result_of_another_version_of_its_scan_is_not_taken_for_done(tmp_path):
    # A scan sent again, or reconstructed again, under its name: its old result was kept for good, being named right.
    import nibabel as nib
    import numpy as np

    from flareseg.phantom import make_phantom
    from flareseg.volume import read_ct, write_labels

    def ct(shape, shift=0.0):
        img = make_phantom(shape, (8.0, 8.0, 10.0), seed=3).to_nifti()[0]
        if shift:
            affine = img.affine.copy()
            affine[0, 3] += shift
            img = nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header)
        (tmp_path / "in").mkdir(exist_ok=True)
        nib.save(img, tmp_path / "in" / "c0_0000.nii.gz")
        return tmp_path / "in" / "c0_0000.nii.gz"

    out = tmp_path / "out"
    scan = ct((24, 24, 6))
    vol = read_ct(scan)
    write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, out / "c0.nii.gz")
    assert [p.status for p in plan_folder([scan], out)] == ["skipped"]  # its own result: done
    ct((24, 24, 8))  # more slices now
    (planned,) = plan_folder([scan], out)
    assert planned.status == "failed" and str(planned.error) == (
        f"{out / 'c0.nii.gz'}: exists but is a 24 x 24 x 6 grid, where its input {scan} now is 24 x 24 x 8; "
        "remove it to redo the case"
    )
    ct((24, 24, 6), shift=5.0)  # the same grid, moved 5 mm
    (planned,) = plan_folder([scan], out)
    assert planned.status == "failed" and "lies elsewhere than its input" in str(planned.error)
    assert "(voxel centres up to 5 mm apart)" in str(planned.error)
    assert [p.status for p in plan_folder([scan], out, overwrite=True)] == ["run"]
    # The same world grid, the result's voxels stored in another order (LPS, square slices: the same shape): not
    # a result flareseg wrote for it, and a scorer comparing arrays would read its labels flipped.
    ct((24, 24, 6))
    from conftest import reorient

    own = nib.load(out / "c0.nii.gz")
    nib.save(reorient(nib.Nifti1Image(np.asarray(own.dataobj), own.affine), ("L", "P", "S")), out / "c0.nii.gz")
    (planned,) = plan_folder([scan], out)
    assert planned.status == "failed" and "(its voxel axes are ordered or flipped otherwise)" in str(planned.error)
    # A result whose affine is not finite, or singular (written by another tool, damaged): its case fails alone.
    import gzip

    whole = bytearray(gzip.decompress((out / "c0.nii.gz").read_bytes()))
    for rows in (np.full(12, np.nan, "<f4"), np.zeros(12, "<f4")):
        whole[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1: the sform alone
        whole[280:328] = rows.tobytes()  # srow_x, srow_y, srow_z
        (out / "c0.nii.gz").write_bytes(gzip.compress(bytes(whole)))
        (planned,) = plan_folder([scan], out)
        assert planned.status == "failed" and str(planned.error) == (
            f"{out / 'c0.nii.gz'}: exists but has an affine that places its voxels nowhere (not finite, or singular); "
            "remove it to redo the case"
        )
    # The input's affine damaged, the result whole: not the result's fault (the run reads the input and says so).
    write_labels(np.zeros(vol.array.shape, np.uint8), vol.geometry, out / "c0.nii.gz")
    damaged = bytearray(gzip.decompress(scan.read_bytes()))
    damaged[252:256] = np.array([0, 1], "<i2").tobytes()
    damaged[280:328] = np.zeros(12, "<f4").tobytes()
    scan.write_bytes(gzip.compress(bytes(damaged)))
    assert jobs.result_of_another_scan(out / "c0.nii.gz", scan, "nifti") is None


def test_a_grid_s_offset_is_the_distance_its_voxel_centres_move():
    """A (3, 4, 0) mm shift moves every voxel 5 mm, not 4; and any order of the same grid is 0 away."""
    import numpy as np

    from flareseg.volume import grid_offset_mm

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    moved = affine.copy()
    moved[:3, 3] += (3.0, 4.0, 0.0)
    assert grid_offset_mm((5, 6, 7), affine, (5, 6, 7), moved) == pytest.approx(5.0)
    flipped = affine.copy()
    flipped[0] = -flipped[0]  # axis 0 runs the other way, from the far end: the same voxel centres
    flipped[0, 3] = 0.8 * 4
    assert grid_offset_mm((5, 6, 7), affine, (5, 6, 7), flipped) == pytest.approx(0.0, abs=1e-12)
    assert grid_offset_mm((5, 6, 7), affine, (6, 5, 7), affine) is None
    # Same origin, another spacing along one axis: the far end of that axis moves (n - 1) x the difference, a
    # grid that only the far corners tell apart (a prediction on 3 mm slices against a 2.5 mm ground truth).
    for axis, n in enumerate((5, 6, 7)):
        stretched = affine.copy()
        stretched[axis, axis] += 0.5
        assert grid_offset_mm((5, 6, 7), affine, (5, 6, 7), stretched) == pytest.approx(0.5 * (n - 1)), axis


@pytest.mark.parametrize("output_type", ["nifti", "dicom-seg"])
def test_a_result_made_while_its_series_was_still_arriving_is_not_taken_for_done(tmp_path, output_type):
    import numpy as np
    from dicom_series import phantom, write_series
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from flareseg.dicom import read_series, write_seg
    from flareseg.volume import write_labels

    series = tmp_path / "in" / "s1"
    files = write_series(series, phantom())
    out = tmp_path / "out"
    out.mkdir()
    (planned,) = plan_folder([series], out, output_type)
    vol = read_series(series)
    labels = np.zeros(vol.array.shape, np.uint8)
    write_seg(labels, vol, planned.output) if output_type == "dicom-seg" else write_labels(
        labels, vol.geometry, planned.output
    )
    (tmp_path / "in" / "s1" / "notes.txt").write_text("not a slice")  # clutter is not counted
    index = Dataset()  # nor a DICOMDIR under another name, which reading the series passes over too
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    index.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index.FileSetID = "DISC1"
    index.save_as(series / "index.dcm", enforce_file_format=True)
    assert [p.status for p in plan_folder([series], out, output_type)] == ["skipped"]
    files[0].rename(tmp_path / "slice-held-back")  # as if the result had been made before it came
    (planned,) = plan_folder([series], out, output_type)
    said = "references" if output_type == "dicom-seg" else "holds"
    assert planned.status == "failed" and str(planned.error) == (
        f"{planned.output}: exists but {said} {len(files)} slices, where the series {series} now holds "
        f"{len(files) - 1}; remove it to redo the case"
    )


@pytest.mark.parametrize("output_type", ["nifti", "dicom-seg"])
def test_a_series_sent_again_with_as_many_slices_is_not_taken_for_the_one_its_result_was_made_of(tmp_path, output_type):
    # A scan reconstructed again under its name (new UIDs, another field of view) with the same slice count: the
    # resumed run kept the old result, judged by the count alone.
    import numpy as np
    from dicom_series import phantom, write_series

    from flareseg.dicom import read_series, write_seg
    from flareseg.volume import write_labels

    series, out = tmp_path / "in" / "s1", tmp_path / "out"
    files = write_series(series, phantom())
    out.mkdir()
    (planned,) = plan_folder([series], out, output_type)
    vol = read_series(series)
    labels = np.zeros(vol.array.shape, np.uint8)
    if output_type == "dicom-seg":
        write_seg(labels, vol, planned.output)
    else:
        write_labels(labels, vol.geometry, planned.output)
    assert [p.status for p in plan_folder([series], out, output_type)] == ["skipped"]

    def again(k, ds):  # the same patient, study and series number: the same case name
        ds.PixelSpacing = [float(v) * 0.9 for v in ds.PixelSpacing]

    for path in files:
        path.unlink()
    write_series(series, phantom(), edit=again)
    (planned,) = plan_folder([series], out, output_type)
    assert planned.status == "failed"
    if output_type == "dicom-seg":
        now = read_series(series).source.datasets[0].SeriesInstanceUID
        old = vol.source.datasets[0].SeriesInstanceUID
        said = f"references the series {old}, where {series} now holds the series {now}"
    else:
        said = f"has other pixel spacing or orientation than the series {series} now has"
    assert str(planned.error) == f"{planned.output}: exists but {said}; remove it to redo the case"
    if output_type == "nifti":  # moved 5 mm along the slices (another field of view): no slice of it lies there
        for path in sorted(series.iterdir()):
            path.unlink()

        def moved(k, ds):
            x, y, z = ds.ImagePositionPatient
            ds.ImagePositionPatient = [x, y, float(z) + 5]

        write_series(series, phantom(), edit=moved)
        (planned,) = plan_folder([series], out, output_type)
        assert planned.status == "failed" and "has no slice where " in str(planned.error)
        assert f"of the series {series} now lies (a scan sent or reconstructed again?)" in str(planned.error)
