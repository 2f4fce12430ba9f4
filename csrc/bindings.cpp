// The Python module: the contract's enums (Tag, Klass), the STATUS_* bits and KEY_VERSION, which
// flopcount/capture/native/ reads from here rather than keeping copies, and the functions.

#include "native.h"

namespace flopcount_native {
namespace {

int64_t dtype_code(const at::Tensor& t) { return static_cast<int64_t>(t.scalar_type()); }

}  // namespace
}  // namespace flopcount_native

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace flopcount_native;
  m.doc() = "flopcount native capture: RecordFunction observer aggregating op keys in C++";
  py::enum_<Tag>(m, "Tag", "Key tags (capture/native/decode.py decodes them)")
      .value("NONE", kNone)
      .value("TENSOR", kTensor)
      .value("INT", kInt)
      .value("DOUBLE", kDouble)
      .value("BOOL", kBool)
      .value("STRING", kString)
      .value("INT_LIST", kIntList)
      .value("DOUBLE_LIST", kDoubleList)
      .value("BOOL_LIST", kBoolList)
      .value("LIST", kList)
      .value("DTYPE", kDtype)
      .value("OPAQUE", kOpaque)
      .value("VALUES", kValues)
      .value("PENDING_VALUES", kPendingValues)
      .value("TENSOR_DTYPE", kTensorDtype)
      .value("SCALAR_NOT_KEPT", kScalarNotKept);
  py::enum_<Klass>(m, "Klass", "How the registry classifies an op (pushed with set_op_classes)")
      .value("UNKNOWN", kUnknown)
      .value("ZERO", kZero)
      .value("FORMULA", kFormula)
      .value("UNCOUNTED", kUncounted)
      .value("FORMULA_VALUES", kFormulaValues)
      .value("COLLECTIVE", kCollective)
      .value("FORMULA_SHAPES", kFormulaShapes);
  m.attr("KEY_VERSION") = kKeyVersion;
  m.attr("OUTPUTS") = kOutputs;
  m.attr("STATUS_VIOLATION") = kViolation;
  m.attr("STATUS_BOUNDARY") = kBoundary;
  m.attr("STATUS_PYTHON_HOOKS") = kPythonHooks;
  m.attr("STATUS_NEW_OPS") = kNewOps;
  m.attr("SLOTS") = kSlots;
  m.def("enable", &enable, py::arg("strict"), py::arg("by_key") = false);
  m.def("disable", &disable, py::arg("index"), py::arg("keep_key") = false);
  m.def("captures_by_key", &captures_by_key);
  m.def("key_included_here", &key_included_here);
  m.def("release", &release);
  m.def("set_op_classes", &set_op_classes);
  m.def("set_context", &set_context);
  m.def("backward_event", &backward_event);
  m.def("add_module_hook", &add_module_hook);
  m.def("module_call", &module_call);
  m.def("backward_module", &backward_module);
  m.def("set_module_name", &set_module_name);
  m.def("clear_backward_modules", &clear_backward_modules);
  bind_module_fast_path(m);
  m.def("mark_pending_boundary", &mark_pending_boundary);
  m.def("set_paused", &set_paused);
  m.def("take_violation", &take_violation);
  m.def("drain", &drain);
  m.def("set_planned", &set_planned);
  m.def("op_names", &op_names, py::arg("start") = 0);
  m.def("strings", &strings, py::arg("start") = 0);
  m.def("dtype_code", &dtype_code);
  m.def("floor_enable", &floor_enable, py::arg("inputs") = true, py::arg("outputs") = true);
  m.def("dispatch_floor_enable", &dispatch_floor_enable);
  m.def("floor_disable", &floor_disable);
}
