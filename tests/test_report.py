import base64
import math
import random
import re
import struct
import zlib

from privgrad.cli.report import write_report

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _quantiles(vals):
    s = sorted(vals)
    return {f"q{int(p * 100):02d}": s[int(p * (len(s) - 1))] for p in (0.05, 0.25, 0.5, 0.75, 0.95)}


def _inputs():
    rng = random.Random(0)
    metrics, histograms = [], []
    for step in range(1, 31):
        clip = 1.0 + 0.02 * step
        pre = [rng.lognormvariate(0, 1.5) for _ in range(64)]
        post = [min(v, clip) for v in pre]
        metrics.append({
            "step": step, "epoch": (step - 1) // 10 + 1, "loss": 2.0 / step,
            "epsilon": math.inf if step == 1 else 0.1 * step,
            "fraction_clipped": sum(v > clip for v in pre) / len(pre), "batch_size": len(pre),
            "max_grad_norm": clip, "norms_pre": _quantiles(pre), "norms_post": _quantiles(post),
        })
        if step in (1, 15):
            histograms.append({"step": step, "pre": pre, "post": post, "max_grad_norm": clip})
    histograms.append({"step": 30, "pre": [], "post": [], "max_grad_norm": 1.6})
    epochs = [{"epoch": e, "train_accuracy": 0.5 + 0.1 * e, "test_accuracy": 0.45 + 0.1 * e,
               "epsilon": 1.0 * e} for e in (1, 2, 3)]
    summary = {"test_accuracy": 0.75, "epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 1.1,
               "steps": 30, "clipping": "adaptive", "model": "<script>alert(1)</script>",
               "dataset": "synthetic", "seconds": 12345.678}
    return metrics, histograms, epochs, summary


def _check_png(data):
    assert data[:8] == PNG_SIG
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(ctype + body) & 0xFFFFFFFF == crc
        chunks.append((ctype, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 0 and height > 0
    idat = b"".join(body for ctype, body in chunks if ctype == b"IDAT")
    assert zlib.decompress(idat)
    assert chunks[-1][0] == b"IEND"


def test_write_report(tmp_path):
    metrics, histograms, epochs, summary = _inputs()
    out = tmp_path / "report.html"
    write_report(out, metrics=metrics, histograms=histograms, epochs=epochs, summary=summary)
    assert out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    text = out.read_text(encoding="utf-8")
    assert "privgrad training report" in text
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*https?://""", text, re.I)
    payloads = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(payloads) >= 5
    for payload in payloads:
        _check_png(base64.b64decode(payload, validate=True))
    assert "NOT covered by the differential-privacy guarantee" in text
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "infinite ε" in text


def test_write_report_empty(tmp_path):
    out = tmp_path / "empty.html"
    write_report(out, metrics=[], histograms=[], epochs=[], summary={})
    text = out.read_text(encoding="utf-8")
    assert len(re.findall(r"data:image/png;base64,", text)) >= 4


def test_the_privacy_statement_heads_the_report_and_numbers_keep_their_magnitude(tmp_path):
    from privgrad.accounting import PrivacyLedger
    from privgrad.clipping import Flat
    from privgrad.statement import build_statement

    ledger = PrivacyLedger()
    ledger.record(1.1, 0.01, 50, sensitivity=1e300)
    statement = build_statement(ledger, clipping=Flat(1e300), sensitivity=1e300,
                                expected_batch_size=64.0, public=("K = 10 <classes>",))
    metrics, histograms, epochs, summary = _inputs()
    summary = {**summary, "max_grad_norm": 1e300, "privacy_statement": statement.to_dict()}
    out = tmp_path / "report.html"
    write_report(out, metrics=metrics, histograms=histograms, epochs=epochs, summary=summary)
    text = out.read_text(encoding="utf-8")
    assert text.index('<section class="statement">') < text.index('class="warning"')
    assert f"ε = {statement.epsilon(1e-5):.6g} at δ = 1e-05" in text
    assert "<td>1e+300</td>" in text  # the statement's S and the summary's max_grad_norm
    assert "<tr><th>max_grad_norm</th><td>1e+300</td></tr>" in text
    assert "1,000,000" not in text and "{&#x27;mechanism" not in text  # no dict dump
    assert "K = 10 &lt;classes&gt;" in text
