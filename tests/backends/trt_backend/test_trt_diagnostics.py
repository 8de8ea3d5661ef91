"""Failed builds explained from TensorRT's log (message texts as TensorRT 8.6-10.x print them)."""

from __future__ import annotations

from quantkit.backends.tensorrt.diagnostics import (
    LogBook,
    LogRecord,
    ParserIssue,
    diagnose_build_failure,
    layers_named,
    onnx_nodes_in,
    parser_error,
)

DOWN = "/model/layers.0/mlp/down_proj/MatMul"
ACT = "/model/layers.0/mlp/act_fn/Sigmoid"


def err(message: str) -> LogRecord:
    return LogRecord("ERROR", message)


def warn(message: str) -> LogRecord:
    return LogRecord("WARNING", message)


NO_IMPL = [
    err(f"10: Could not find any implementation for node {DOWN}."),
    err(f"10: [optimizer.cpp::computeCosts::3869] Error Code 10: Internal Error (Could not find "
        f"any implementation for node {DOWN}.)"),
]


def test_obey_failure_names_the_layer_and_suggests_prefer():
    error = diagnose_build_failure(NO_IMPL, constraints="obey", known_nodes=[DOWN, ACT])
    text = str(error)
    assert f"layer '{DOWN}'" in text
    assert f"ONNX node(s): {DOWN}" in text
    assert "OBEY" in text
    assert "constraints 'prefer'" in error.hint


def test_fused_layer_names_map_back_to_onnx_nodes():
    fused = f"{DOWN} + PWN(PWN({ACT}), /model/layers.0/mlp/Mul)"
    records = [err(f"Error Code 10: Internal Error (Could not find any implementation for node "
                   f"{fused}.)")]
    assert layers_named(records) == [fused]
    assert onnx_nodes_in(fused, [DOWN, ACT, "/model/layers.0/mlp/down_proj"]) == [DOWN, ACT]
    error = diagnose_build_failure(records, constraints="obey", known_nodes=[DOWN, ACT])
    assert f"ONNX node(s): {DOWN}, {ACT}" in str(error)


def test_prefer_mode_strict_warning_names_the_layer():
    records = [
        warn("No implementation of layer /a/Conv + /a/Relu obeys the requested constraints in "
             "strict mode. No conforming implementation was found i.e. requested layer "
             "computation precision and output precision types are ignored, using the fastest "
             "implementation."),
        err("Error Code 4: Internal Error (Engine generation failed)"),
    ]
    assert layers_named(records) == ["/a/Conv + /a/Relu"]
    error = diagnose_build_failure(records, constraints="obey")
    assert "layer '/a/Conv + /a/Relu'" in str(error) and "prefer" in error.hint


def test_gpu_out_of_memory():
    records = [
        err("2: [virtualMemoryBuffer.cpp::resizePhysical::145] Error Code 2: OutOfMemory (no "
            "further information)"),
        warn("Requested amount of GPU memory (17179869184 bytes) could not be allocated. There "
             "may not be enough free memory for allocation to succeed."),
        *NO_IMPL,
    ]
    error = diagnose_build_failure(records, constraints="obey", known_nodes=[DOWN])
    assert str(error).startswith("the GPU ran out of memory while TensorRT built the engine")
    assert "OutOfMemory" in str(error)
    assert "max batch/seq" in error.hint


def test_out_of_memory_warnings_explain_a_missing_implementation():
    records = [
        warn("Requested amount of GPU memory (4294967296 bytes) could not be allocated. There may "
             "not be enough free memory for allocation to succeed."),
        warn("Skipping tactic 3 due to insufficient memory on requested size of 4294967296 "
             "detected for tactic 0x0000000000000004."),
        *NO_IMPL,
    ]
    error = diagnose_build_failure(records, constraints=None)
    assert "ran out of memory" in str(error)


def test_insufficient_workspace():
    records = [err(f"Could not find any implementation for node {DOWN} due to insufficient "
                   f"workspace. See verbose log for requested sizes.")]
    error = diagnose_build_failure(records, constraints="obey", workspace_mib=64)
    assert f"layer '{DOWN}' within the workspace limit (now 64 MiB)" in str(error)
    assert "workspace_mib" in error.hint


def test_without_constraints_the_layer_is_still_named():
    error = diagnose_build_failure(NO_IMPL, constraints=None)
    assert str(error).startswith(f"TensorRT found no implementation for layer '{DOWN}'")
    assert "prefer" not in str(error)


def test_other_errors_are_passed_on_verbatim():
    records = [
        LogRecord("INFO", "[MemUsageChange] Init CUDA: CPU +2, GPU +0, now: CPU 30, GPU 500 (MiB)"),
        err("IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error (Network has dynamic "
            "or shape inputs, but no optimization profile has been defined.)"),
    ]
    error = diagnose_build_failure(records, constraints=None)
    assert "no optimization profile has been defined" in str(error)


def test_silent_failure():
    error = diagnose_build_failure([LogRecord("INFO", "hello")], constraints=None)
    assert "logged no error" in str(error)


def test_logbook_keeps_the_tail_and_filters_text():
    book = LogBook(limit=3)
    for i in range(5):
        book.add("INFO", f"info {i}")
    book.add("WARNING", "careful")
    assert [r.message for r in book.records] == ["info 3", "info 4", "careful"]
    assert book.dropped == 3
    assert book.text("WARNING") == "[WARNING] careful\n"
    assert book.text("INFO").count("\n") == 3
    assert book.warnings() == [LogRecord("WARNING", "careful")]


def test_parser_error_lists_the_errors():
    issues = [ParserIssue(f"/n{i}", "FancyOp", "No importer registered for op: FancyOp")
              for i in range(12)]
    error = parser_error("/tmp/m.onnx", issues)
    text = str(error)
    assert text.startswith("TensorRT's ONNX parser rejected /tmp/m.onnx: 12 error(s): node '/n0' "
                           "(FancyOp): No importer registered for op: FancyOp")
    assert "(and 2 more)" in text
    assert str(ParserIssue(None, None, "bad model")) == "bad model"
