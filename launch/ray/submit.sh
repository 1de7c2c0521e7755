#!/bin/bash
# jaxarch: ${description}
# Submits the job to the Ray cluster at $$RAY_ADDRESS (e.g. http://HEAD:8265). Ray uploads
# this folder and runs entrypoint.py, which starts one `jaxarch train` per node with the
# JAX_* variables that join them. Rendered by `jaxarch launch --target=ray` from
# launch/ray/submit.sh; run with `bash FILE`.
set -euo pipefail

${submit}
