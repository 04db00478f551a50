"""One embedding run, as a Ray job entry point. Same flags as ``embed-images run``:

    ray job submit --working-dir . -- python -m jobs.embed_images \
        --input s3://bucket/photos/ --output s3://bucket/embeddings/resnet50/

Inside a submitted job ``RAY_ADDRESS`` is set, so it joins that cluster; run by hand without it,
it starts a local Ray.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
