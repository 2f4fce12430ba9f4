// Backward modules: which module's backward is running, per autograd graph task, kept here so that
// gradient hooks run no Python. The rule is flopcount/capture/context.py's BackwardModules (one
// table-driven test, tests/test_native_modules.py, pins both): a module's backward begins at the
// first gradient of its outputs and ends once the gradients of all its inputs exist.
// Also the module hooks' hot path (module_call) and the context Python pushes (set_context).

#include "native.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>

namespace flopcount_native {

int64_t innermost_backward_locked(const Slot& s, int64_t task) {
  auto it = s.backward_stacks.find(task);
  return it == s.backward_stacks.end() || it->second.empty() ? -1 : it->second.back();
}

// Python-side context changed (module, optimizer, user phase). Returns what Python should act
// on promptly (the STATUS_* bits).
int64_t set_context(int64_t index, int64_t context, bool optimizer) {
  Slot& s = slot(index);
  s.context.store(context);
  s.optimizer.store(optimizer);
  State& shared = state();
  return (s.has_violation.load() ? kViolation : 0) | (s.boundary_crossed.load() ? kBoundary : 0) |
         (shared.classified.load(std::memory_order_relaxed) < shared.described.load(std::memory_order_relaxed)
              ? kNewOps : 0);
}

namespace {

bool is_descendant(const Slot& s, int64_t module, int64_t ancestor) {
  if (ancestor == s.root_module) return true;
  if (std::max(module, ancestor) >= static_cast<int64_t>(s.module_names.size())) return false;
  const std::string& name = s.module_names[module];
  const std::string& prefix = s.module_names[ancestor];
  return name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 && name[prefix.size()] == '.';
}

void enter_locked(Slot& s, int64_t task, int64_t module) {
  // Nested modules can share an output tensor (an MLP returns its down_proj's output); the outer
  // module's hook fires later but must sit below its submodules.
  auto& stack = s.backward_stacks[task];
  size_t i = stack.size();
  while (i > 0 && is_descendant(s, stack[i - 1], module)) --i;
  stack.insert(stack.begin() + static_cast<std::ptrdiff_t>(i), module);
  s.has_backward_modules = true;
  s.backward_version.fetch_add(1, std::memory_order_release);
}

void leave_locked(Slot& s, int64_t task, int64_t module) {
  auto it = s.backward_stacks.find(task);
  if (it == s.backward_stacks.end()) return;
  auto& stack = it->second;
  for (size_t i = stack.size(); i > 0; --i) {
    if (stack[i - 1] == module) {
      stack.erase(stack.begin() + static_cast<std::ptrdiff_t>(i - 1));
      s.backward_version.fetch_add(1, std::memory_order_release);
      break;
    }
  }
}

// A gradient hook fired in the current graph task: module ``module`` enters or leaves backward.
void backward_event_locked(Slot& s, int64_t module, bool enter) {
  int64_t task = torch::autograd::get_current_graph_task_id();
  if (enter) {
    enter_locked(s, task, module);
  } else {
    leave_locked(s, task, module);
  }
}

// A pre-hook on an autograd node: it runs when the node is about to run, i.e. once the node's
// gradients are complete, and dies with the graph.
struct ModuleHook : torch::autograd::FunctionPreHook {
  ModuleHook(int64_t index, int64_t incarnation, int64_t module, bool enter)
      : index(index), incarnation(incarnation), module(module), enter(enter) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    Slot& s = slot(index);
    if (s.incarnation.load() != incarnation) return grads;  // its meter has ended
    std::lock_guard<std::mutex> lock(s.mu);
    backward_event_locked(s, module, enter);
    return grads;
  }

  // Compiled autograd asks every hook to register itself; this one only tracks modules for
  // eager backward, so under compiled autograd it stays out (instead of failing the backward).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {}

  int64_t index, incarnation, module;
  bool enter;
};

// ---- one call per module call ---------------------------------------------------------------
// The module hooks' hot path (Context._module_pre/_module_post with the native backend): set the
// context as set_context does and hook the autograd node that made the tensors of ``value`` that
// require grad, the rule of Context._when_grads, without more Python. Only what that rule decides
// the same way in C++ is handled here: plain tensors directly in ``value``, a tuple, a list or a
// plain dict of them, all made by one node. Anything else (several nodes, a leaf, a tensor
// subclass, another container) sets kPythonHooks and Python applies the rule itself.
struct Grads {
  c10::intrusive_ptr<torch::autograd::Node> node;  // the one node, once seen
  bool python = false;
};

void grads_of_tensor(PyObject* obj, Grads& g) {
  if (!THPVariable_CheckExact(obj)) {  // a subclass may answer requires_grad / grad_fn in Python
    g.python = true;
    return;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.requires_grad()) return;
  const auto& fn = t.grad_fn();
  if (!fn) {  // a leaf: Python hooks it (its hooks outlive the graph)
    g.python = true;
  } else if (!g.node) {
    g.node = fn;
  } else if (g.node.get() != fn.get()) {
    g.python = true;
  }
}

void grads_of(PyObject* value, Grads& g) {
  if (THPVariable_Check(value)) {
    grads_of_tensor(value, g);
  } else if (PyTuple_Check(value) || PyList_Check(value)) {
    PyObject* seq = value;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n && !g.python; ++i) {
      if (THPVariable_Check(items[i])) grads_of_tensor(items[i], g);
    }
  } else if (PyDict_CheckExact(value)) {
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (!g.python && PyDict_Next(value, &pos, &k, &v)) {
      if (THPVariable_Check(v)) grads_of_tensor(v, g);
    }
  } else if (value != Py_None) {
    g.python = true;  // a model output object, or anything Python knows how to open
  }
}

}  // namespace

// The same, from a Python hook (tensors from several nodes, or leaves).
void backward_event(int64_t index, int64_t module, bool enter) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  backward_event_locked(s, module, enter);
}

// Hook the node that made ``tensor``: module ``module`` enters backward there (``enter``) or
// leaves it. False when the tensor has no node (a leaf): Python takes that case.
bool add_module_hook(int64_t index, const at::Tensor& tensor, int64_t module, bool enter) {
  const auto& node = tensor.grad_fn();
  if (!node) return false;
  Slot& s = slot(index);
  node->add_pre_hook(std::make_unique<ModuleHook>(index, s.incarnation.load(), module, enter));
  return true;
}

int64_t module_call(int64_t index, int64_t context, bool optimizer, int64_t module, py::handle value,
                    bool enter) {
  int64_t status = set_context(index, context, optimizer);
  if (value.is_none()) return status;
  Grads g;
  grads_of(value.ptr(), g);
  if (g.python) return status | kPythonHooks;
  if (g.node) {
    Slot& s = slot(index);
    g.node->add_pre_hook(std::make_unique<ModuleHook>(index, s.incarnation.load(), module, enter));
  }
  return status;
}

// The innermost backward module of graph task ``task``, or -1.
int64_t backward_module(int64_t index, int64_t task) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  return innermost_backward_locked(s, task);
}

// Module ids are Python's (NativeCapture._module_id), dense from 0.
void set_module_name(int64_t index, int64_t module, const std::string& name, bool root) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.module_names.size() <= static_cast<size_t>(module)) s.module_names.resize(module + 1);
  s.module_names[module] = name;
  if (root) s.root_module = module;
}

void clear_backward_modules(int64_t index) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  s.backward_stacks.clear();
  s.backward_version.fetch_add(1, std::memory_order_release);
  s.has_backward_modules = false;
}

}  // namespace flopcount_native
