"""Stand-ins for ONNX Runtime's GPU execution providers (onnxruntime-gpu, MIGraphX), which this machine lacks.

`get_available_providers` lists them; a session records the providers and options it was given and what it
was fed, computes on the real CPU provider, and reports the requested providers as active, or, for those
named `failing`, falls back to the CPU as onnxruntime-gpu does when a provider's libraries do not load.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import onnxruntime

from runtimes.engine_dir import manifest_digest


@dataclass
class SessionRecord:
    providers: list[str]
    options: dict[str, dict]
    fed: list[dict[str, tuple]] = field(default_factory=list)  # input name -> shape, per run


class StandInGpuProviders:
    def __init__(self, monkeypatch, providers, failing=()):
        self.sessions: list[SessionRecord] = []
        real_session, real_available = onnxruntime.InferenceSession, onnxruntime.get_available_providers
        sessions = self.sessions

        class Session(real_session):
            def __init__(self, path, sess_options=None, providers=None, **kwargs):
                names = [p[0] if isinstance(p, tuple) else p for p in providers]
                options = {p[0]: dict(p[1]) for p in providers if isinstance(p, tuple)}
                self.record = SessionRecord(names, options)
                sessions.append(self.record)
                super().__init__(path, sess_options, providers=["CPUExecutionProvider"])
                self._active = [n for n in names if n not in failing]

            def get_providers(self):
                return self._active

            def run(self, output_names, feeds, run_options=None):
                self.record.fed.append({name: tuple(array.shape) for name, array in feeds.items()})
                return super().run(output_names, feeds, run_options)

        available = real_available() + [p for p in providers if p not in real_available()]
        monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)


def engine_for_target(source, destination, target, **fields):
    """A copy of the cpu engine `source` whose manifest says `target` (a kiln.targets.Target): its backend,
    device and providers, plus `fields`; the graph is the same, so the stand-ins can run it."""
    engine = shutil.copytree(source, destination)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest.update(target=target.name, backend=target.backend, device=target.device,
                    providers=list(target.providers), **fields)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    return engine
