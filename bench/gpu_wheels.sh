#!/usr/bin/env bash
# Wheels of what kdnb and its tests need that the device image lacks (the device tool's KINDS.md package list, read
# 2026-11-17: its Python is 3.12 with torch, timm, transformers, pandas, matplotlib, pytest), pinned to the versions
# this project's venv resolves, into .whl/ (kept out of git by .git/info/exclude). A device call names ".whl" in its
# carry; bench/gpu_session.sh installs them with pip --no-index --target.
#   bash bench/gpu_wheels.sh && du -sh .whl     # about 25 MB
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PKGS=(annotated-types==0.8.0 asttokens==3.0.2 astunparse==1.6.3 beautifulsoup4==4.15.0 bleach==6.4.0 comm==0.2.3
  debugpy==1.8.22 defusedxml==0.7.1 entrypoints==0.4.2 execnb==0.1.18 executing==2.3.0 fastcore==1.14.5 fastgit==0.1.4
  fastjsonschema==2.22.3 ghapi==1.1.1 httpcore2==2.17.0 httpx2==2.17.0 ipykernel==7.4.0 ipython==9.19.1
  ipython-pygments-lexers==1.1.1 jedi==0.20.1 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  jupyter-client==8.10.0 jupyter-core==5.9.1 jupyterlab-pygments==0.3.0 matplotlib-inline==0.2.2 mistune==3.4.0
  nbclient==0.11.0 nbconvert==7.17.2 nbdev==2.4.14 nbformat==5.11.1 nest-asyncio2==1.7.4 pandocfilters==1.5.1
  papermill==2.7.0 parso==0.8.7 pexpect==4.9.0 platformdirs==4.14.9 prompt-toolkit==3.0.53 ptyprocess==0.7.0
  pure-eval==0.2.4 pydantic==2.14.4 pydantic-core==2.50.5 pyzmq==27.3.0 referencing==0.37.0 rpds-py==2026.9.1
  segmentation-models-pytorch==0.6.0 soupsieve==4.1.4 stack-data==0.6.3 tenacity==9.2.1 tinycss2==1.5.1
  tomlkit==0.15.3 tornado==6.6.1 traitlets==5.16.1 truststore==0.10.5 typing-inspection==0.4.5 watchdog==7.1.1
  wcwidth==0.9.5 webencodings==0.6.1)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"
ls .whl | wc -l
