#!/usr/bin/env bash
# Device-side step of getting relu-smollm2 onto the device (shared/docs/device-facts.md): each call carries one
# ignored folder .devN with some int8 shards; they gather in /tmp/model-int8. The part with materialize.py
# writes the HF checkpoint to /tmp/relu-smollm2. Usage: bash scripts/device_model_part.sh N
set -euo pipefail
part=$1
mkdir -p /tmp/model-int8/int8
cp .dev$part/*.safetensors /tmp/model-int8/int8/ 2>/dev/null || true
if [ -f .dev$part/materialize.py ]; then
    cp .dev$part/*.json .dev$part/materialize.py /tmp/model-int8/
    n=$(ls /tmp/model-int8/int8 | wc -l)
    [ "$n" = 10 ] || { echo "only $n of 10 shards on the device: the machine went cold, start again from part 1"; exit 3; }
    python3 /tmp/model-int8/materialize.py /tmp/relu-smollm2
    mkdir -p /tmp/data && cp .dev$part/*.txt /tmp/data/  # calib.txt, wiki-dev.txt
fi
ls /tmp/model-int8/int8 | wc -l
