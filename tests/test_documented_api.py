"""Every class and member of the architecture document's class diagram exists where the document says.

`tests/architecture_diagram.md` is a verbatim copy of the document's class diagram and module table (CI runs
from a clean clone, where the document itself may be absent); when the document is present, the copy must
still match it. The checks, all read off the copy:

- every class imports from the module the table names for it (a `<<module>>` class is that module itself);
- every `+member` / `-member` exists on it: a method, property, class attribute, dataclass / pydantic field,
  enum member, or an attribute set on a small instance built below (or, for classes without one, assigned
  as `self.<name>` in the class's own source);
- a method's documented parameters are accepted under those names and in that order; any extra parameter it
  has is optional.

What deliberately differs from the document is listed in DEVIATIONS with its reason; nothing else is skipped.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import re
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "tests" / "architecture_diagram.md"
DOCUMENT_PATHS = (Path("/work/shared/seed/architecture.md"), ROOT.parent / "shared" / "seed" / "architecture.md")


@dataclasses.dataclass(frozen=True)
class Deviation:
    """A documented member that deliberately differs. It must still exist; only `extra_required` (parameters
    the documented call leaves out, which ours needs) or, with `signature=False`, the whole parameter check
    is relaxed."""

    reason: str
    extra_required: tuple[str, ...] = ()
    signature: bool = True


# (class, member) -> how and why it differs from the document. Keep this short: fix the code instead where the
# documented form can work.
DEVIATIONS: dict[tuple[str, str], Deviation] = {
    # Builders hold no per-request state (astrai.serve.builder: one instance per protocol serves every request of
    # an app, concurrently), and every frame repeats its request's id, time and model: the request's GenContext
    # comes first. `token` is accepted under its documented name.
    **{
        (builder, "format_chunk"): Deviation("stateless builders take the request's GenContext", ("ctx",))
        for builder in ("ResponseBuilder", "OpenAIResponseBuilder", "AnthropicResponseBuilder")
    },
    # Private steps of handle(). Ours streams from one engine handle per choice (OpenAI `n`), not one async
    # generator, and the stop strings travel with the engine request (SamplingParams.stop, held back and
    # trimmed by the engine's StopChecker), so they are not passed again.
    **{
        ("ProtocolHandler", step): Deviation("engine handles per choice; stops applied by the engine", signature=False)
        for step in ("_handle_stream", "_handle_non_stream")
    },
    # Private: also takes the store's path, so that a malformed store's error names the file.
    ("Store", "_normalize"): Deviation("its errors name the file", ("path",)),
}


# --- reading the vendored copy ---------------------------------------------------------------------------------


def documented_sections(text: str) -> str:
    """The class diagram and module table: from '## Class Diagram' up to the heading after '## Module Overview'."""
    lines = text.splitlines()
    start = lines.index("## Class Diagram")
    table = lines.index("## Module Overview", start)
    end = next((i for i in range(table + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


@dataclasses.dataclass
class Member:
    name: str
    private: bool  # `-name` in the diagram
    params: list[str] | None  # None: an attribute; a list (maybe empty): a method and its documented parameters
    static: bool = False  # `name(...)$`
    line: str = ""


@dataclasses.dataclass
class DocClass:
    name: str
    namespace: str
    stereotype: str | None = None
    members: list[Member] = dataclasses.field(default_factory=list)


# Type words that may follow an attribute's name (`+vocab_size int`); otherwise the name is the last word.
TYPE_WORDS = {"int", "str", "float", "bool", "dict", "list", "tuple", "Tensor", "Any"}


def parse_member(raw: str) -> list[Member]:
    private = raw.startswith("-")
    text = raw[1:].split("#", 1)[0].strip()  # `# only if ...` is a comment
    static = text.endswith("$")
    text = text.rstrip("$").strip()
    method = re.fullmatch(r"(\w+)\((.*?)\)(.*)", text)
    if method:
        params = [p.strip().split("=", 1)[0].strip() for p in method.group(2).split(",") if p.strip()]
        found = [Member(method.group(1), private, params, static, raw)]
        # `__getattr__(name) Any (bos_id, eos_id, pad_id, stop_ids)`: names the method makes available
        if provided := re.search(r"\(([\w, ]+)\)\s*$", method.group(3)):
            found += [Member(n.strip(), private, None, line=raw) for n in provided.group(1).split(",")]
        return found
    text = re.sub(r"\s*\(property\).*", "", text)  # `keys (property)`, `sync_gradients (property) bool`
    if ":" in text:  # `builder: ResponseBuilder`
        return [Member(text.split(":", 1)[0].strip(), private, None, line=raw)]
    words = text.split(None, 1)
    if len(words) == 2 and "," in words[1]:  # `Linear q_proj, k_proj, v_proj, o_proj`
        return [Member(n.strip(), private, None, line=raw) for n in words[1].split(",")]
    words = text.split()
    name = words[0] if len(words) == 2 and words[1] in TYPE_WORDS else words[-1]
    return [Member(name, private, None, line=raw)]


def parse_diagram(text: str) -> dict[str, DocClass]:
    body = text.split("```mermaid", 1)[1].split("```", 1)[0]
    classes: dict[str, DocClass] = {}
    namespace, current = None, None
    for line in body.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"namespace (\w+) \{", line):
            namespace = m.group(1)
        elif m := re.fullmatch(r"class (\w+) \{", line):
            current = classes.setdefault(m.group(1), DocClass(m.group(1), namespace))
        elif line == "}":
            if current is None:
                namespace = None
            current = None
        elif current is not None and (m := re.fullmatch(r"<<(\w+)>>", line)):
            current.stereotype = m.group(1)
        elif current is not None and line[:1] in "+-":
            current.members.extend(parse_member(line))
        elif current is not None and current.stereotype == "enumeration" and re.fullmatch(r"\w+", line):
            current.members.append(Member(line, False, None, line=line))
    return classes


def parse_table(text: str, classes: dict[str, DocClass]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Class name -> module, and module -> the other names it lists (functions, `app`).

    The copy lost the dashes of the table's ranges: `BaseDatasetGRPODataset` is `BaseDataset`-`GRPODataset`,
    every class between them in the diagram's order."""
    order = list(classes)
    modules: dict[str, str] = {}
    other: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not (m := re.fullmatch(r"\| \*\*([\w.]+)\*\* \| (.*?) \| .* \|", line)):
            continue
        module = m.group(1)
        for item in m.group(2).split(", "):
            item = re.sub(r"\(Protocol\)|\[T\]", "", item).strip()
            if item in classes:
                modules[item] = module
                continue
            span = [(a, item[len(a) :]) for a in order if item.startswith(a) and item[len(a) :] in classes]
            if span:
                first, last = span[0]
                for name in order[order.index(first) : order.index(last) + 1]:
                    modules[name] = module
            else:
                other.setdefault(module, []).extend(item.split("/"))
    return modules, other


@functools.cache
def diagram() -> tuple[dict[str, DocClass], dict[str, str], dict[str, list[str]]]:
    text = documented_sections(VENDORED.read_text(encoding="utf-8"))
    classes = parse_diagram(text)
    modules, other = parse_table(text, classes)
    for cls in classes.values():  # a class the table does not list lives in its namespace's module
        modules.setdefault(cls.name, f"astrai.{cls.namespace}")
    return classes, modules, other


# --- resolving names -----------------------------------------------------------------------------------------


def resolve(cls: DocClass) -> object:
    """The documented class (or, for `<<module>>`, the module) from the module the table names."""
    _, modules, _ = diagram()
    module = importlib.import_module(modules[cls.name])
    if cls.stereotype == "module":
        return module
    return getattr(module, cls.name)


def assigned_attributes(target: type) -> set[str]:
    """Names a class or its bases assign as `self.<name> = ...` (or register as buffers) in their own source."""
    names: set[str] = set()
    for klass in inspect.getmro(target):
        if klass.__module__ in ("builtins", "typing", "abc") or klass.__module__.startswith("torch"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        names.add(sub.attr)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("register_buffer", "register_parameter", "register_module", "add_module")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names.add(node.args[0].value)
    return names


def declared_fields(target: type) -> set[str]:
    names: set[str] = set()
    for klass in inspect.getmro(target):
        names |= set(vars(klass).get("__annotations__", {}))
    if dataclasses.is_dataclass(target):
        names |= {f.name for f in dataclasses.fields(target)}
    names |= set(getattr(target, "model_fields", {}))  # pydantic
    return names


def has_member(target: object, instance: object | None, name: str) -> bool:
    if hasattr(target, name):
        return True
    if isinstance(target, types.ModuleType):
        return False
    if instance is not None:
        return hasattr(instance, name)
    return name in declared_fields(target) or name in assigned_attributes(target)


def method_signature(target: object, instance: object | None, name: str) -> inspect.Signature:
    fn = getattr(instance if instance is not None else target, name)
    sig = inspect.signature(fn)
    raw = inspect.getattr_static(target, name) if isinstance(target, type) else fn
    if instance is None and isinstance(target, type) and inspect.isfunction(raw):  # unbound: drop `self`
        params = list(sig.parameters.values())[1:]
        sig = sig.replace(parameters=params)
    return sig


def signature_problem(documented: list[str], sig: inspect.Signature) -> str | None:
    """Why a call with the documented parameters would not bind, or None."""
    params = list(sig.parameters.values())
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    position = -1
    for doc in documented:
        if doc.startswith("**"):
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return f"takes no {doc}"
            continue
        if doc.startswith("*"):
            if not any(p.kind is p.VAR_POSITIONAL for p in params):
                return f"takes no {doc}"
            continue
        index = next((i for i, p in enumerate(named) if p.name == doc), None)
        if index is None:
            return f"has no parameter {doc!r}"
        if index < position:
            return f"takes {doc!r} before {named[position].name!r}"
        position = index
    extra = [p.name for p in named if p.name not in documented and p.default is p.empty]
    if extra:
        return f"also requires {extra}"
    return None


# --- small instances, for attributes that only exist once built ----------------------------------------------
#
# Built with every optional part on (qk-norm, gated attention, a bias), so conditional members exist. The inference
# objects are the ones an engine composes (the scheduler's cache, executor and task manager), not separate copies.


def tiny_tokenizer():
    from astrai.tokenize import train_bpe_tokenizer

    return train_bpe_tokenizer(iter(["Hello world, how are you today?"] * 20), vocab_size=300)


ENCODER_FIELDS = dict(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, dim_ffn=64, max_len=64)


def lm_config(**changes):
    from astrai.config import AutoRegressiveLMConfig

    return AutoRegressiveLMConfig(**{**ENCODER_FIELDS, "use_qk_norm": True, "use_gated_attention": True, **changes})


MLA_FIELDS = dict(attn_type="mla", n_kv_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8)


def engine_parts(engine) -> dict[str, object]:
    scheduler = engine.scheduler
    cache = scheduler._page_cache
    pool = cache._pool
    table = cache.make_table_tensor([], "cpu")
    return {
        "InferenceEngine": engine,
        "InferenceScheduler": scheduler,
        "Executor": scheduler._executor,
        "TaskManager": scheduler._task_mgr,
        "KVCache": cache,
        "PagePool": pool,
        "Allocator": pool._alloc,
        "PrefixCache": pool._prefix,
        "Storage": cache._storage,
        "TaskTable": cache._table,
        "KvcacheView": cache.bind(table, 0),
    }


def other_instances() -> Iterator[tuple[str, Callable[[], object]]]:
    import torch

    from astrai import config, factory, inference, model, parallel, serialization, tokenize, trainer
    from astrai.dataset import ResumableDistributedSampler

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    yield "AutoRegressiveLM", lambda: model.AutoRegressiveLM(lm_config())
    yield (
        "EmbeddingEncoder",
        lambda: model.EmbeddingEncoder(
            config.EncoderConfig(**ENCODER_FIELDS, use_qk_norm=True, use_gated_attention=True)
        ),
    )
    yield "DecoderBlock", lambda: model.DecoderBlock(lm_config(), 0)
    yield "GQA", lambda: model.GQA(lm_config(), 0)
    yield "MLA", lambda: model.MLA(lm_config(**MLA_FIELDS), 0)
    yield "MLP", lambda: model.MLP(32, 64)
    yield "DeepSeekMoE", lambda: model.DeepSeekMoE(32, 64, 4)
    yield "RMSNorm", lambda: model.RMSNorm(32)
    yield "Linear", lambda: model.Linear(4, 4, bias=True)
    yield "RotaryEmbedding", lambda: model.RotaryEmbedding(8, 16)
    yield "Embedding", lambda: model.Embedding(10, 4)
    yield "AutoTokenizer", tiny_tokenizer
    yield "ChatTemplate", lambda: tokenize.ChatTemplate("{{ messages }}")
    yield "Registry", factory.Registry
    yield "Task", lambda: inference.Task("t", [1, 2])
    yield "GenerateResult", inference.GenerateResult
    yield "StopChecker", lambda: inference.StopChecker(["x"])
    yield "TemperatureStrategy", lambda: inference.TemperatureStrategy(0.7)
    yield "TopKStrategy", lambda: inference.TopKStrategy(5)
    yield "TopPStrategy", lambda: inference.TopPStrategy(0.9)
    yield "SamplingPipeline", lambda: inference.SamplingPipeline([inference.TopKStrategy(5)])
    yield "GenContext", lambda: inference.GenContext(resp_id="r", created=0, model="m", prompt_tokens=1)
    yield "GradientState", lambda: parallel.GradientState(2)
    yield "AccumOptimizer", lambda: parallel.AccumOptimizer(optimizer(), parallel.GradientState(2))
    yield (
        "AccumScheduler",
        lambda: parallel.AccumScheduler(
            torch.optim.lr_scheduler.LambdaLR(optimizer(), lambda step: 1.0), parallel.GradientState(2)
        ),
    )
    yield "NoneExecutor", parallel.NoneExecutor
    yield "Checkpoint", lambda: serialization.Checkpoint({})
    yield "ResumableDistributedSampler", lambda: ResumableDistributedSampler(range(8), rank=0, num_replicas=1)
    yield "SEQStrategy", lambda: trainer.SEQStrategy(model.Linear(2, 2), "cpu")
    yield "CosineScheduler", lambda: trainer.CosineScheduler(optimizer(), 2, 10)
    yield "SGDRScheduler", lambda: trainer.SGDRScheduler(optimizer(), 2, 10, 0.1)
    yield "GradientClippingCallback", lambda: trainer.GradientClippingCallback(1.0)
    yield "GradientCheckpointingCallback", trainer.GradientCheckpointingCallback
    yield "CheckpointCallback", lambda: trainer.CheckpointCallback("ckpt", 10)
    yield "ProgressBarCallback", lambda: trainer.ProgressBarCallback(1)
    yield "MetricLoggerCallback", lambda: trainer.MetricLoggerCallback("logs")
    yield "ValidationCallback", trainer.ValidationCallback


@pytest.fixture(scope="module")
def instances() -> Iterator[dict[str, object]]:
    import torch

    from astrai.inference import InferenceEngine, ProtocolHandler
    from astrai.serve.openai_builder import OpenAIResponseBuilder
    from astrai.serve.openai_schema import ChatCompletionRequest

    torch.manual_seed(0)
    from astrai.model import AutoRegressiveLM

    engine = InferenceEngine(
        AutoRegressiveLM(lm_config()).eval(), tiny_tokenizer(), max_batch_size=2, pack_weights=False, cuda_graphs=False
    )
    try:
        built = engine_parts(engine)
        request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
        built["ProtocolHandler"] = ProtocolHandler(request, engine, OpenAIResponseBuilder("m"), http_request=None)
        built.update((name, build()) for name, build in other_instances())
        yield built
    finally:
        engine.shutdown()


# --- the checks --------------------------------------------------------------------------------------------------


def gaps(cls: DocClass, instance: object | None) -> list[str]:
    """What of a documented class is missing or differs (empty: it is all there)."""
    try:
        target = resolve(cls)
    except (ImportError, AttributeError) as exc:
        return [f"{cls.name}: cannot import: {exc}"]
    if instance is not None and isinstance(target, type):
        assert isinstance(instance, target), f"the {cls.name} instance built above is a {type(instance)}"
    found = []
    for member in cls.members:
        deviation = DEVIATIONS.get((cls.name, member.name))
        if not has_member(target, instance, member.name):
            found.append(f"{cls.name}.{member.name} is missing ({member.line})")
            continue
        if member.params is None or (deviation is not None and not deviation.signature):
            continue
        try:
            sig = method_signature(target, instance, member.name)
        except (TypeError, ValueError) as exc:
            found.append(f"{cls.name}.{member.name}: no signature: {exc}")
            continue
        if deviation is not None:
            allowed = [p for p in sig.parameters.values() if p.name not in deviation.extra_required]
            sig = sig.replace(parameters=allowed)
        if problem := signature_problem(member.params, sig):
            found.append(f"{cls.name}.{member.name}{sig} {problem} ({member.line})")
    return found


CHECKED = [c for c in diagram()[0].values() if c.stereotype != "singleton"]

# (class, member) -> a gap the check finds that is not a deliberate deviation but lies in code another change owns;
# the check requires it to still be a gap, so whoever fixes it must delete the entry. Each is a to-do, not a waiver.
KNOWN_GAPS: dict[tuple[str, str], str] = {}
# (base, derived) -> a documented generalization that does not hold yet, on the same terms as KNOWN_GAPS.
KNOWN_INHERITANCE_GAPS: dict[tuple[str, str], str] = {}


def test_vendored_diagram_matches_the_architecture_document():
    document = next((p for p in DOCUMENT_PATHS if p.is_file()), None)
    if document is None:
        pytest.skip("the architecture document is not beside this checkout (a clean clone): the vendored copy is used")
    vendored = VENDORED.read_text(encoding="utf-8")
    assert vendored.startswith("<!-- Vendored verbatim from the architecture document")
    assert documented_sections(vendored) == documented_sections(document.read_text(encoding="utf-8")), (
        f"{VENDORED.name} differs from {document}: copy its '## Class Diagram' and '## Module Overview' sections again"
    )


def test_the_diagram_parses_as_the_document_describes_it():
    classes, modules, other = diagram()
    assert len(classes) == len(re.findall(r"^class \w+ \{$", VENDORED.read_text(encoding="utf-8"), flags=re.M)) == 104
    # The table puts every class in its diagram namespace's module ...
    assert {name: f"astrai.{c.namespace}" for name, c in classes.items()} == modules
    # ... and its other names (the parallel helpers) are the members of the <<module>> class of that namespace.
    functions = {m.name for c in classes.values() if c.stereotype == "module" for m in c.members}
    assert list(other) == ["astrai.parallel"] and set(other["astrai.parallel"]) == functions
    assert (classes["MLA"].members[-1].name, classes["MLA"].members[-1].params) == (
        "forward",
        ["x", "rotary_emb", "attn_mask", "paged_cache"],
    )
    assert {"q_norm", "k_norm", "gate"} <= {m.name for m in classes["MLA"].members}
    assert {"bos_id", "eos_id", "pad_id", "stop_ids"} <= {m.name for m in classes["AutoTokenizer"].members}


def test_every_deviation_names_a_documented_member():
    classes, _, _ = diagram()
    for cls, member in DEVIATIONS:
        assert member in {m.name for m in classes[cls].members}, f"stale deviation {cls}.{member}"


@pytest.mark.parametrize("cls", CHECKED, ids=[c.name for c in CHECKED])
def test_documented_class_and_members_exist(cls, instances):
    found = gaps(cls, instances.get(cls.name))
    known = {member for name, member in KNOWN_GAPS if name == cls.name}
    assert [g for g in found if not any(g.startswith(f"{cls.name}.{m}") for m in known)] == []
    fixed = [m for m in known if not any(g.startswith(f"{cls.name}.{m}") for g in found)]
    assert fixed == [], f"fixed: delete {[(cls.name, m) for m in fixed]} from KNOWN_GAPS"


def generalization_problem(base: str, derived: str) -> str | None:
    """Why `derived` is not a documented `base`, or None."""
    classes, _, _ = diagram()
    parent, child = resolve(classes[base]), resolve(classes[derived])
    if getattr(parent, "_is_protocol", False):  # a <<protocol>>: structural, every documented method present
        missing = [m.name for m in classes[base].members if not hasattr(child, m.name)]
        return f"{derived} does not implement {base}: no {missing}" if missing else None
    return None if parent in inspect.getmro(child) else f"{derived} is not a {base}"


def test_inheritance_is_as_documented():
    pairs = re.findall(r"^(\w+) <\|-- (\w+)$", VENDORED.read_text(encoding="utf-8"), flags=re.M)
    assert len(pairs) == 46
    problems = {pair: generalization_problem(*pair) for pair in pairs}
    assert [p for pair, p in problems.items() if p and pair not in KNOWN_INHERITANCE_GAPS] == []
    fixed = [pair for pair in KNOWN_INHERITANCE_GAPS if problems.get(pair) is None]
    assert fixed == [], f"fixed: delete {fixed} from KNOWN_INHERITANCE_GAPS"


def test_app_is_the_served_fastapi_app(tmp_path):
    """`astrai.inference.app`: the FastAPI app serving the model folder $ASTRAI_MODEL names. In a fresh process:
    it is built on first access and kept, with an engine running."""
    import os
    import subprocess
    import sys

    import torch

    from astrai.model import AutoRegressiveLM

    torch.manual_seed(0)
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    code = (
        "from fastapi import FastAPI; import astrai.inference as m; app = m.app; "
        "assert isinstance(app, FastAPI) and app is m.app, type(app); app.state.engine.shutdown()"
    )
    env = {**os.environ, "ASTRAI_MODEL": str(tmp_path), "ASTRAI_DEVICE": "cpu"}
    env.pop("ASTRAI_API_KEY", None)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


def test_builders_accept_the_documented_call_forms():
    """format_chunk(ctx, token), format_stream_end(ctx, stop), format_response(ctx, content, stop) for a
    generation the caller ran itself: the content and the stop sequence reach the wire format."""
    from astrai.inference import AnthropicResponseBuilder, GenContext, OpenAIResponseBuilder

    def context():
        return GenContext(resp_id="r", created=0, model="m", prompt_tokens=3)

    openai, anthropic = OpenAIResponseBuilder("m"), AnthropicResponseBuilder("m")
    assert '"content":"Hi"' in openai.format_chunk(context(), token="Hi")
    body = openai.format_response(context(), "Hello", None)
    assert (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]) == ("Hello", "stop")
    body = anthropic.format_response(context(), content="Hello ", stop="wor")
    assert [body["content"][0]["text"], body["stop_reason"], body["stop_sequence"]] == [
        "Hello ",
        "stop_sequence",
        "wor",
    ]
    assert '"stop_reason":"end_turn"' in "".join(anthropic.format_stream_end(context(), None))
    assert '"stop_sequence":"wor"' in "".join(anthropic.format_stream_end(context(), stop="wor"))
    assert '"finish_reason":"stop"' in "".join(openai.format_stream_end(context(), "wor"))


# --- the distributions' READMEs list what each provides ---------------------------------------------------------


def providing_distribution(module_name: str) -> str:
    """The packages/<distribution> folder whose source defines `module_name`."""
    path = Path(importlib.import_module(module_name).__file__).resolve()
    return path.relative_to(ROOT / "packages").parts[0]


def provided_names() -> dict[str, set[tuple[str, str]]]:
    """Distribution -> {(documented module, name)} of the diagram's classes (and <<module>> functions) it defines."""
    classes, modules, _ = diagram()
    provided: dict[str, set[tuple[str, str]]] = {}
    for cls in classes.values():
        if cls.stereotype == "singleton":  # `app`: built on access (test_app_is_the_served_fastapi_app)
            entries = [(cls.name, "astrai.serve.env_app")]
        elif cls.stereotype == "module":
            module = resolve(cls)
            entries = [(m.name, getattr(module, m.name).__module__) for m in cls.members]
        else:
            entries = [(cls.name, resolve(cls).__module__)]
        for name, defined_in in entries:
            provided.setdefault(providing_distribution(defined_in), set()).add((modules[cls.name], name))
    return provided


def readme_names(readme: Path) -> set[tuple[str, str]]:
    """(module, name) pairs of the '## Documented names' section's bullets: "- `astrai.x` (note): `A`, `B`"."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("\n## Documented names\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    bullets = re.split(r"\n(?=- )", re.sub(r"\n  +", " ", section))
    names = set()
    for bullet in bullets:
        if m := re.match(r"- `(astrai\.\w+)`(?: \([^)]*\))?: (.*)", bullet.strip()):
            names |= {(m.group(1), name) for name in re.findall(r"`(\w+)`", m.group(2))}
    return names


def test_each_readme_lists_the_documented_names_its_distribution_provides():
    provided = provided_names()
    assert sorted(provided) == ["astrai-core", "astrai-infer", "astrai-model", "astrai-serve", "astrai-train"]
    assert sum(len(v) for v in provided.values()) == len(diagram()[0]) - 1 + 6  # Functions is six functions
    for distribution, names in provided.items():
        assert readme_names(ROOT / "packages" / distribution / "README.md") == names, distribution
