"""The entry points re-run themselves with malloc on huge pages, once, and only where it helps."""
import os
import platform
import subprocess
import sys

import pytest

from diffusion_jax import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# prints what the re-run process sees; the arguments must survive the re-exec
PROBE = ("import os, sys; from diffusion_jax import huge_pages; huge_pages.reexec_if_useful(); "
         "print(repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:])")


def _run_probe(**env_extra):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(env_extra, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", PROBE, "a b", "--flag=1"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=True)
  return out.stdout.strip()


@pytest.mark.parametrize("text,mode", [("always [madvise] never\n", "madvise"),
                                       ("[always] madvise never\n", "always"),
                                       ("always madvise [never]\n", "never"), ("", None)])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert huge_pages.thp_mode(str(path)) == mode
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


def test_wanted_only_for_madvise_mode_without_user_tunables():
  glibc_linux = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
  assert huge_pages.wanted({}, "madvise") == glibc_linux
  assert not huge_pages.wanted({}, "always")  # the kernel already gives huge pages
  assert not huge_pages.wanted({}, "never")
  assert not huge_pages.wanted({}, "")  # mode unknown
  assert not huge_pages.wanted({"GLIBC_TUNABLES": ""}, "madvise")  # set, even empty: opt out
  assert not huge_pages.wanted({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "madvise")


def test_process_reruns_itself_with_the_tunable_and_its_arguments():
  if not huge_pages.wanted({}):
    pytest.skip(f"no re-exec wanted here (THP mode {huge_pages.thp_mode()!r}, "
                f"libc {platform.libc_ver()[0]!r})")
  assert _run_probe() == f"{huge_pages.TUNABLE!r} ['a b', '--flag=1']"


def test_user_tunables_are_left_alone():
  assert _run_probe(GLIBC_TUNABLES="") == "'' ['a b', '--flag=1']"
  assert _run_probe(GLIBC_TUNABLES="glibc.malloc.check=0") == (
      "'glibc.malloc.check=0' ['a b', '--flag=1']")
