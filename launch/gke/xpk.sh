#!/bin/bash
# jaxarch: ${description}
# The same job as the JobSet next to this file, through xpk on a cluster that xpk created:
# xpk writes the JobSet itself (node selectors, multislice and GPU coordinator variables).
# Rendered by `jaxarch launch --target=gke` from launch/gke/xpk.sh; run with `bash FILE`.
set -euo pipefail

xpk workload create \
  ${flags}
