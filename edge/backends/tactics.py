"""TensorRT's tactic sources (config `engine.tactic_sources`): which a release has, parsing
the setting, what `auto` means on a Jetson, and which libraries a build then loads. Pure
Python: the config check and the memory plan read it where TensorRT is not installed."""

# TacticSource members and the release that added each: enum TacticSource in
# include/NvInferRuntime.h at NVIDIA/TensorRT tags 8.2.1 (CUBLAS, CUBLAS_LT, CUDNN), 8.4.1
# (+ EDGE_MASK_CONVOLUTIONS), 8.5.1 (+ JIT_CONVOLUTIONS); 8.6.1 and v10.x have the same five,
# CUBLAS and CUDNN "Deprecated in TensorRT 10.0", CUBLAS_LT "Deprecated in TensorRT 9.0".
# (No 8.3 tag exists to check: the backend asks the installed `trt.TacticSource` itself.)
TACTIC_SOURCES = (("CUBLAS", (8, 2)), ("CUBLAS_LT", (8, 2)), ("CUDNN", (8, 2)),
                  ("EDGE_MASK_CONVOLUTIONS", (8, 4)), ("JIT_CONVOLUTIONS", (8, 5)))
_SOURCE_ALIASES = {"CUBLASLT": "CUBLAS_LT"}     # trtexec's spelling (8.2.1 sampleOptions.cpp)
# The sources that are libraries of their own, by edge.memoryplan's FIGURES name: what
# `auto` turns off on a Jetson. "Init cuBLAS/cuBLASLt" is one figure for both cuBLAS sources.
LIBRARY_SOURCES = (("CUBLAS", "cublas"), ("CUBLAS_LT", "cublas"), ("CUDNN", "cudnn"))
LIBRARIES_OFF_BY_DEFAULT = (10, 0)   # 10.0 header: CUBLAS, CUDNN "Disabled by default"
CUBLAS_LT_OFF_BY_DEFAULT = (10, 1)   # "Enabled by default" at v10.0.0, "Disabled" from v10.1.0


def tactic_sources_of(version):
    """The TacticSource names TensorRT `version` ((major, minor)) has, in enum order."""
    return tuple(name for name, since in TACTIC_SOURCES if tuple(version[:2]) >= since)


def parse_tactic_sources(text):
    """`auto`, `default`, or a tuple of (sign, NAME) edits of TensorRT's default sources from
    a trtexec-style list such as "-CUDNN,-CUBLAS,+CUBLAS_LT"; ValueError saying what is wrong."""
    words = str(text).strip()
    if words.lower() in ("auto", "default"):
        return words.lower()
    known = [name for name, _ in TACTIC_SOURCES]
    edits = []
    for item in words.split(","):
        item = item.strip()
        if len(item) < 2 or item[0] not in "+-":
            raise ValueError("auto, default, or a list of tactic sources each prefixed with + "
                             "(enable) or - (disable), e.g. -CUDNN,-CUBLAS,-CUBLAS_LT (got {!r} "
                             "in it)".format(item))
        name = item[1:].strip().upper()
        name = _SOURCE_ALIASES.get(name, name)
        if name not in known:
            raise ValueError("{!r} is not a tactic source; known: {}".format(
                item[1:], ", ".join(known)))
        edits.append((item[0], name))
    return tuple(edits)


def format_tactic_sources(edits):
    """The one spelling of a list of edits (the last edit of a source wins, enum order), or
    "default" when there are none: what the build options and the engine cache key hold."""
    final = dict((name, sign) for sign, name in edits)
    text = ",".join(final[name] + name for name, _ in TACTIC_SOURCES if name in final)
    return text or "default"


def resolve_tactic_sources(setting, version, integrated, available=None):
    """The build's tactic sources for the setting `setting` (config `engine.tactic_sources`)
    on TensorRT `version` ((major, minor)): "default" (TensorRT's own) or a normalised edit
    list. `auto` turns the library sources off on an integrated GPU (a Jetson, whose CPU and
    GPU share the memory cuBLAS and cuDNN take) and leaves TensorRT's defaults elsewhere.
    `available`: the names this TensorRT has (default: those of its release). ValueError when
    a listed source is not in this version."""
    have = tuple(available) if available is not None else tactic_sources_of(version)
    parsed = parse_tactic_sources(setting)
    if parsed == "default" or (parsed == "auto" and not integrated):
        return "default"
    if parsed == "auto":
        return format_tactic_sources(
            [("-", name) for name, _ in LIBRARY_SOURCES if name in have])
    missing = [name for _, name in parsed if name not in have]
    if missing:
        raise ValueError("TensorRT {}.{} has no tactic source {} (it has {}); remove it from "
                         "the list or use auto".format(version[0], version[1],
                                                       ", ".join(missing), ", ".join(have)))
    return format_tactic_sources(parsed)


def default_tactic_sources(version):
    """The library sources TensorRT `version` enables when none are set: CUBLAS and CUDNN
    before 10.0 (8.2.1 NvInfer.h, setTacticSources: "By default, kCUBLAS and kCUDNN are
    always enabled"), with CUBLAS_LT "for x86 platforms as well as non-x86 platforms when
    CUDA >= 11.0" (counted as on: not on a Nano's CUDA 10.2, on Orin's CUDA 11.4); only
    CUBLAS_LT in 10.0; none from 10.1 (v10.1.0 NvInferRuntime.h)."""
    version = tuple(version[:2])
    if version < LIBRARIES_OFF_BY_DEFAULT:
        return frozenset(("CUBLAS", "CUBLAS_LT", "CUDNN"))
    if version < CUBLAS_LT_OFF_BY_DEFAULT:
        return frozenset(("CUBLAS_LT",))
    return frozenset()


def tactic_libraries(version, resolved):
    """The libraries ("cublas", "cudnn": edge.memoryplan's names) a build with the resolved
    tactic sources `resolved` loads on TensorRT `version`, in that order."""
    enabled = set(default_tactic_sources(version))
    if resolved != "default":
        for sign, name in parse_tactic_sources(resolved):
            if sign == "+":
                enabled.add(name)
            else:
                enabled.discard(name)
    libraries = []
    for name, library in LIBRARY_SOURCES:
        if name in enabled and library not in libraries:
            libraries.append(library)
    return tuple(libraries)
