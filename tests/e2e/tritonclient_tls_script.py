"""Runs in its own process (tritonclient's `inference` descriptors clash with ours in one pool, kserve#3099).

``python tritonclient_tls_script.py <host:port> <ca.pem> <token> <model> <x.npy>``: talks to a TLS server with
tritonclient.grpc (``ssl=True``, the token in ``headers=``) and prints one JSON object with what it saw.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def run(url: str, ca_file: str, token: str, model: str, x_path: str) -> dict[str, Any]:
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    x = np.load(x_path)
    c = tc.InferenceServerClient(url, ssl=True, root_certificates=ca_file)  # tritonclient takes the file's path
    headers = {"authorization": f"Bearer {token}"}
    out: dict[str, Any] = {
        "live_without_token": c.is_server_live(),
        "ready_without_token": c.is_server_ready(),
        "model_ready": c.is_model_ready(model, headers=headers),
    }
    md = c.get_model_metadata(model, headers=headers, as_json=True)
    tensor = tc.InferInput(md["inputs"][0]["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    out_name = md["outputs"][0]["name"]
    result = c.infer(model, [tensor], outputs=[tc.InferRequestedOutput(out_name)], headers=headers)
    out["y"] = result.as_numpy(out_name).tolist()

    def status(call: Any) -> str | None:
        try:
            call()
        except InferenceServerException as exc:
            return exc.status()
        return None

    out["infer_without_token"] = status(lambda: c.infer(model, [tensor]))
    out["unload_with_infer_token"] = status(lambda: c.unload_model(model, headers=headers))
    c.close()
    return out


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:6])))
