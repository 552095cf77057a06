"""Nothing to build: the stack packs this checkout, the node builds the image from it.

The bundle is reproducible, so the launch inputs (user data) are a function of the packaged
files: `pulumi up` on the same checkout changes nothing, a changed file replaces the instances
(`user_data_replace_on_change`), and a change to the documentation does not.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from r1nest.cloud.bundle import BUNDLE_PATHS, README_STANDIN, build_bundle
from r1nest.errors import ConfigError
from r1nest.paths import REPO_ROOT

from .conftest import ECR_IMAGE

INSTANCE = "aws:ec2/instance:Instance"


def _copy_checkout(target: Path) -> Path:
    target.mkdir(parents=True)
    for name in BUNDLE_PATHS:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    return target


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A copy of this checkout that the stack packs instead of the real one."""
    from r1nest_aws import deployment

    root = _copy_checkout(tmp_path / "checkout")
    monkeypatch.setattr(deployment, "CHECKOUT_ROOT", root)
    monkeypatch.setattr(deployment, "BUNDLE_DIR", tmp_path / "bundles")
    return root


def _launch_inputs(run) -> list[str]:
    return [i.inputs["userData"] for i in run.of(INSTANCE)]


def test_the_bundle_is_reproducible_and_holds_the_build_context():
    first, second = build_bundle(REPO_ROOT), build_bundle(REPO_ROOT)
    assert first.data == second.data and first.sha256 == hashlib.sha256(first.data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(first.data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert {"pyproject.toml", "README.md", "images/vllm.Dockerfile", "images/vllm.Dockerfile.dockerignore",
                "images/sglang.Dockerfile", "service/r1nest/__init__.py", "templates/overview.html.j2"} <= set(members)
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in members)
        assert "images/README.md" not in members  # documentation only
        assert tar.extractfile("README.md").read() == README_STANDIN
        assert all(m.mtime == 0 and m.uid == 0 and m.mode in (0o644, 0o755) for m in members.values())


def test_same_checkout_same_launch_inputs(run_stack, checkout):
    first, second = run_stack(), run_stack()
    assert _launch_inputs(first) == _launch_inputs(second)
    assert first.outputs["source_sha256"] == second.outputs["source_sha256"] == build_bundle(checkout).sha256
    obj = first.one("aws:s3/bucketObjectv2:BucketObjectv2")
    assert obj.inputs["key"] == f"r1nest-source/{first.outputs['source_sha256']}.tar.gz"


@pytest.mark.parametrize("change", ["edit", "add", "remove"])
def test_a_changed_file_changes_the_launch_inputs(run_stack, checkout, change):
    before = run_stack()
    target = checkout / "service" / "r1nest" / "cloud" / "costs.py"
    if change == "edit":
        target.write_text(target.read_text() + "\n# changed\n")
    elif change == "add":
        (checkout / "templates" / "extra.txt").write_text("new\n")
    else:
        target.unlink()
    after = run_stack()
    assert after.outputs["source_sha256"] != before.outputs["source_sha256"]
    (old,), (new,) = _launch_inputs(before), _launch_inputs(after)
    assert old != new and after.outputs["source_sha256"] in new and before.outputs["source_sha256"] not in new
    assert after.one(INSTANCE).inputs["userDataReplaceOnChange"] is True  # a new user data is a new instance


def test_documentation_changes_do_not_replace_instances(run_stack, checkout):
    before = run_stack()
    (checkout / "README.md").write_text("# rewritten\n")
    assert _launch_inputs(run_stack()) == _launch_inputs(before)


def test_the_node_builds_the_official_image_plus_r1nest_from_the_bundle(run_stack):
    run = run_stack()
    files = {f["path"]: f for f in yaml.safe_load(run.one(INSTANCE).inputs["userData"])["write_files"]}
    script = files["/usr/local/sbin/r1nest-image"]["content"]
    sha = run.outputs["source_sha256"]
    assert f"aws s3 cp --region us-east-1 --only-show-errors {run.outputs['source_bundle']}" in script
    assert f"printf '%s  %s\\n' {sha}" in script and "sha256sum --check" in script
    assert '--file "$WORK/src/"images/vllm.Dockerfile --build-arg WITH_EFA=0' in script
    engine = files["/etc/systemd/system/r1nest-engine.service"]["content"]
    pre = [line for line in engine.splitlines() if line.startswith("ExecStartPre=")]
    assert pre[1:3] == ["ExecStartPre=/usr/local/sbin/r1nest-secrets", "ExecStartPre=/usr/local/sbin/r1nest-image"]
    assert run.outputs["image"] == f"r1nest:vllm-{sha[:12]}" and f" {run.outputs['image']} " in engine
    assert "docker pull" not in engine and "ecr get-login-password" not in str(files)
    # the Dockerfile starts from the engine project's image, pinned by digest
    dockerfile = (REPO_ROOT / "images" / "vllm.Dockerfile").read_text()
    assert any(line.startswith("FROM vllm/vllm-openai:") and "@sha256:" in line for line in dockerfile.splitlines())


def test_sglang_and_multi_node_build_their_own_dockerfile_with_efa(run_stack):
    run = run_stack(model="deepseek-r1", instanceType="p5.48xlarge", nodes="2", engine="sglang")
    for instance in run.of(INSTANCE):
        files = {f["path"]: f["content"] for f in yaml.safe_load(instance.inputs["userData"])["write_files"]}
        assert '"$WORK/src/"images/sglang.Dockerfile --build-arg WITH_EFA=1' in files["/usr/local/sbin/r1nest-image"]


def test_an_image_override_pulls_it_and_uploads_nothing(run_stack):
    run = run_stack(image=ECR_IMAGE)
    assert run.of("aws:s3/bucket:Bucket") == [] and run.of("aws:s3/bucketObjectv2:BucketObjectv2") == []
    assert "source_bundle" not in run.outputs and run.outputs["image"] == ECR_IMAGE
    text = run.one(INSTANCE).inputs["userData"]
    assert f"ExecStartPre=/usr/bin/docker pull {ECR_IMAGE}" in text and "r1nest-image" not in text
    assert "aws ecr get-login-password" in text


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not an r1nest checkout"):
        build_bundle(tmp_path)


def test_the_bundle_is_an_installable_r1nest(tmp_path):
    """What the Dockerfile's `pip install -e /opt/r1nest` gets: a project pip can build."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(fileobj=io.BytesIO(build_bundle(REPO_ROOT).data), mode="r:gz") as tar:
        tar.extractall(src, filter="data")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "out"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "out").glob("r1nest-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "r1nest/cloud/bootstrap.py" in names and "r1nest/testing/fake_engine.py" in names
