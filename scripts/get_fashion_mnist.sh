#!/usr/bin/env bash
# Puts the four Fashion-MNIST IDX files (gzip) under $1 (default /usr/share/datasets/fashion-mnist):
# from Debian's package where we are root, else the official files where there is internet.
set -euo pipefail
dir="${1:-/usr/share/datasets/fashion-mnist}"
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have() { for f in $files; do [ -s "$dir/$f" ] || return 1; done; }
have && { echo "Fashion-MNIST: $dir"; exit 0; }
if [ "$dir" = /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Debian's dataset-fashion-mnist ..."
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true
  have && { echo "Fashion-MNIST: $dir"; exit 0; }
fi
url=http://fashion-mnist.s3-website.eu-central-1.amazonaws.com
mkdir -p "$dir" 2>/dev/null || true
if [ -w "$dir" ]; then
  echo "Downloading Fashion-MNIST into $dir ..."
  ok=1
  for f in $files; do curl -fsSL --max-time 120 -o "$dir/$f" "$url/$f" || { ok=0; break; }; done
  [ $ok = 1 ] && have && { echo "Fashion-MNIST: $dir"; exit 0; }
fi
cat >&2 <<MSG
Fashion-MNIST was not found in $dir and could not be installed or downloaded.
Get the four files ($files)
  - on Debian/Ubuntu as root:  apt-get install dataset-fashion-mnist
  - or from $url/ into a folder of your choice, then run
    make demo FMNIST_DIR=/that/folder   (or --config.data.data_dir=/that/folder)
MSG
exit 1
