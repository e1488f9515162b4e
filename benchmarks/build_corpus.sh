#!/usr/bin/env bash
# The project's distillation corpus: installs the Debian packages that ship the text, then `hybridize corpus`.
#
#   benchmarks/build_corpus.sh OUT
#
# OUT/train.jsonl + OUT/val.jsonl (15 sources less the holdout: technical docs, source code, man pages, licences,
# a dictionary, satire, humour, hacker lore, novels) and OUT/holdout.jsonl: the King James Bible, whole, in no
# other split: a register (early-modern religious prose) that no training source has, for the generalization test.
# Each source is capped at MAX_MB (default 10) million characters so no large technical source dominates.
# About 62 MB of training text (~15M tokens); 4 minutes on 2 cores, mostly rendering man pages.
# Set SKIP_APT=1 to use only what is installed; PYTHON picks the interpreter (default python3).
set -euo pipefail
out=${1:?usage: build_corpus.sh OUT}
py=${PYTHON:-python3}
packages=(python3.11-doc linux-doc libpython3.11-stdlib manpages manpages-dev man-db debian-handbook
          debian-reference-en developers-reference maint-guide gnu-standards base-files jargon-text fortunes
          fortunes-min dict-devil dict-gcide bible-kjv bible-kjv-text r-cran-janeaustenr)
if [ -z "${SKIP_APT:-}" ] && ! dpkg-query -W -f '${Status}\n' "${packages[@]}" 2>/dev/null \
    | grep -c 'install ok installed' | grep -qx "${#packages[@]}"; then
  apt-get update -qq >/dev/null
  # --no-install-recommends: R (r-base-core) comes with janeaustenr, dictd with the dict-* packages, nothing else
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
"$py" -m hybridize corpus "$out" --holdout bible --max-mb-per-source "${MAX_MB:-10}" --val-fraction 0.01 --seed 0
