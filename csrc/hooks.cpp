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

#include <c10/util/SmallVector.h>

#include <structmember.h>

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

// Tensors made by several nodes, torch's register_multi_grad_hook rule without Python: one
// pre-hook per node, sharing this state. Entering (mode "any"): the first of the nodes to run in
// a graph task. Leaving (mode "all"): once every node of them that this graph task executes has
// run, counted when the first one runs (torch._C._will_engine_execute_node's rule).
struct MultiNodeState {
  MultiNodeState(int64_t index, int64_t incarnation, int64_t module, bool enter)
      : index(index), incarnation(incarnation), module(module), enter(enter) {}
  int64_t index, incarnation, module;
  bool enter;
  std::vector<c10::weak_intrusive_ptr<torch::autograd::Node>> nodes;  // weak: the hooks live in them
  std::unordered_map<int64_t, std::pair<int64_t, int64_t>> tasks;  // graph task -> (ran, expected)
};

bool will_execute(torch::autograd::Node* node) {
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  const auto* in_graph = torch::autograd::get_current_graph_task_nodes_in_graph();
  if (exec_info == nullptr || in_graph == nullptr || in_graph->count(node) == 0) return false;
  if (exec_info->empty()) return true;  // no inputs= given: every node in the graph runs
  auto it = exec_info->find(node);
  return it != exec_info->end() && it->second.should_execute();
}

struct MultiNodeHook : torch::autograd::FunctionPreHook {
  explicit MultiNodeHook(std::shared_ptr<MultiNodeState> state) : state(std::move(state)) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    MultiNodeState& m = *state;
    Slot& s = slot(m.index);
    if (s.incarnation.load() != m.incarnation) return grads;  // its meter has ended
    int64_t task = torch::autograd::get_current_graph_task_id();
    std::lock_guard<std::mutex> lock(s.mu);
    auto [it, first] = m.tasks.try_emplace(task, 0, 0);
    auto& [ran, expected] = it->second;
    if (m.enter) {
      if (first) backward_event_locked(s, m.module, true);
      return grads;
    }
    if (first) {
      for (const auto& weak : m.nodes) {
        auto node = weak.lock();
        if (node && will_execute(node.get())) ++expected;
      }
    }
    if (++ran == expected) {
      backward_event_locked(s, m.module, false);
      m.tasks.erase(it);
    }
    return grads;
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {}

  std::shared_ptr<MultiNodeState> state;
};

// Hook ``nodes`` (those that made a module's tensors): module ``module`` enters backward at the
// first of them (``enter``) or leaves it after the last.
void hook_nodes(int64_t index, c10::ArrayRef<c10::intrusive_ptr<torch::autograd::Node>> nodes,
                int64_t module, bool enter) {
  if (nodes.empty()) return;
  int64_t incarnation = slot(index).incarnation.load();
  if (nodes.size() == 1) {
    nodes[0]->add_pre_hook(std::make_unique<ModuleHook>(index, incarnation, module, enter));
    return;
  }
  auto state = std::make_shared<MultiNodeState>(index, incarnation, module, enter);
  for (const auto& node : nodes) {  // no hook fires before backward: the state is complete by then
    state->nodes.emplace_back(node);
    node->add_pre_hook(std::make_unique<MultiNodeHook>(state));
  }
}

// ---- one call per module call ---------------------------------------------------------------
// The module hooks' hot path (Context._module_pre/_module_post with the native backend): set the
// context as set_context does and hook the autograd nodes that made the tensors of ``value`` that
// require grad, the rule of Context._when_grads, without more Python. Only what that rule decides
// the same way in C++ is handled here: plain tensors directly in ``value``, a tuple, a list or a
// dict of them (a dict subclass too, as Hugging Face's ModelOutput, while its ``values`` is
// dict's), made by one node or several, or one leaf (hooked on the tensor: hook_leaf). Anything
// else (several leaves, a leaf and nodes, a tensor subclass, another container) sets
// kPythonHooks and Python applies the rule itself.
struct Grads {
  c10::SmallVector<c10::intrusive_ptr<torch::autograd::Node>, 4> nodes;  // distinct, first seen first; no heap
  at::Tensor leaf;  // the one leaf among them, if any
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
  if (!fn) {  // a leaf; several: Python's multi-grad hook
    if (!g.leaf.defined()) {
      g.leaf = t;
    } else if (!g.leaf.is_same(t)) {
      g.python = true;
    }
    return;
  }
  for (const auto& seen : g.nodes) {
    if (seen.get() == fn.get()) return;
  }
  g.nodes.push_back(fn);
}

// ``value``'s values are what Python's ``x.values()`` gives: dict's own method, not overridden.
bool plain_values(PyObject* value) {
  static PyObject* name = PyUnicode_InternFromString("values");
  static PyObject* dict_values = _PyType_Lookup(&PyDict_Type, name);
  PyTypeObject* type = Py_TYPE(value);
  if (type == &PyDict_Type) return true;
  PyObject* values = _PyType_Lookup(type, name);  // borrowed, through the type's MRO cache
  if (values == dict_values) return true;
  static PyObject* odict_values = [] {  // collections.OrderedDict.values (ModelOutput's base)
    PyObject* collections = PyImport_ImportModule("collections");
    PyObject* odict = collections ? PyObject_GetAttrString(collections, "OrderedDict") : nullptr;
    PyObject* found = odict && PyType_Check(odict) ? _PyType_Lookup(reinterpret_cast<PyTypeObject*>(odict), name) : nullptr;
    Py_XINCREF(found);  // kept for the process
    Py_XDECREF(odict);
    Py_XDECREF(collections);
    PyErr_Clear();
    return found;
  }();
  return values != nullptr && values == odict_values;
}

void grads_of(PyObject* value, Grads& g) {
  // Containers first: THPVariable_Check on a tuple (a module's args) is a full isinstance (~800
  // instructions through Tensor's metaclass); a tuple or list is never a tensor.
  if (PyTuple_Check(value) || PyList_Check(value)) {
    PyObject* seq = value;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n && !g.python; ++i) {
      if (THPVariable_Check(items[i])) grads_of_tensor(items[i], g);
    }
  } else if (PyDict_Check(value) && plain_values(value)) {
    PyObject *k, *v;
    Py_ssize_t pos = 0;  // the dict's own storage: the same values as .values(), maybe in another order
    while (!g.python && PyDict_Next(value, &pos, &k, &v)) {
      if (THPVariable_Check(v)) grads_of_tensor(v, g);
    }
  } else if (THPVariable_Check(value)) {
    grads_of_tensor(value, g);
  } else if (value != Py_None) {
    g.python = true;  // a model output object, or anything Python knows how to open
  }
}

// A leaf's hooks are the tensor's own (AccumulateGrad runs them, impl::hooks), so they outlive
// the graph: as Python's (Context.leaf_hooks) they are removed when the step closes or the meter
// stops (clear_backward_modules). One hook fires once per graph task that computes the leaf's
// gradient, which is torch's multi-grad rule for one tensor, "any" and "all" alike. False: the
// tensor has no autograd state to hold it (Python takes it).
bool hook_leaf(int64_t index, const at::Tensor& leaf, int64_t module, bool enter) {
  if (torch::autograd::impl::get_autograd_meta(leaf) == nullptr) return false;
  Slot& s = slot(index);
  auto hook = std::make_unique<ModuleHook>(index, s.incarnation.load(), module, enter);
  const void* placed = hook.get();
  torch::autograd::impl::hooks(leaf).push_back(std::move(hook));
  std::lock_guard<std::mutex> lock(s.mu);
  s.leaf_hooks.emplace_back(LeafRef(leaf.getIntrusivePtr()), placed);
  return true;
}

// Remove the leaf hooks placed since the last call, from the leaves still alive.
void remove_leaf_hooks(Slot& s) {
  std::vector<std::pair<LeafRef, const void*>> placed;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    placed.swap(s.leaf_hooks);
  }
  for (auto& [ref, hook] : placed) {
    auto impl = ref.lock();
    if (!impl) continue;  // the leaf died, and its hooks with it
    at::Tensor leaf(std::move(impl));
    if (torch::autograd::impl::get_autograd_meta(leaf) == nullptr) continue;
    auto& hooks = torch::autograd::impl::hooks(leaf);
    hooks.erase(std::remove_if(hooks.begin(), hooks.end(),
                               [&](const auto& h) { return static_cast<const void*>(h.get()) == hook; }),
                hooks.end());
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
  hook_nodes(index, node, module, enter);
  return true;
}

int64_t module_call(int64_t index, int64_t context, bool optimizer, int64_t module, py::handle value,
                    bool enter) {
  int64_t status = set_context(index, context, optimizer);
  if (value.is_none()) return status;
  Grads g;
  grads_of(value.ptr(), g);
  if (g.python || (g.leaf.defined() && !g.nodes.empty())) return status | kPythonHooks;
  if (g.leaf.defined()) {
    if (!hook_leaf(index, g.leaf, module, enter)) return status | kPythonHooks;
    return status;
  }
  hook_nodes(index, g.nodes, module, enter);
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

// A step closed or the meter stops (Context.reset_backward, NativeCapture._stop_observing):
// finished graph tasks' stacks go, and the leaf hooks.
void clear_backward_modules(int64_t index) {
  Slot& s = slot(index);
  remove_leaf_hooks(s);
  std::lock_guard<std::mutex> lock(s.mu);
  s.backward_stacks.clear();
  s.backward_version.fetch_add(1, std::memory_order_release);
  s.has_backward_modules = false;
}

// ---- the module hooks' fast path ------------------------------------------------------------
// A meter's Context with the native backend, as the process-wide module hooks call it
// (capture/context.py, Context.use_fast_path): the common case of Context._module_pre /
// _module_post and NativeCapture.module_changed without running Python, on the same Python
// objects. The common case: a module seen before, no model phase (MODEL_PHASES) to open or close,
// calls nested properly, a snapshot and module name already interned. Anything else is handed to
// the Python methods before anything changed, so both paths leave the same state. Failures go to
// the Context's guard as in Python (only BudgetExceeded and strict mode's error pass).
// Each module call runs this twice, so its Python reads are direct: attributes at their slot or
// in their object's dict (Attr), and pre/post are METH_FASTCALL builtins, not pybind methods.
namespace {

PyObject* interned(const char* s) {
  PyObject* o = PyUnicode_InternFromString(s);
  if (o == nullptr) throw py::error_already_set();
  return o;  // kept for the process
}

#ifdef Py_T_OBJECT_EX  // Python 3.12 renamed structmember.h's constants
constexpr int kObjectMember = Py_T_OBJECT_EX;
constexpr int kReadOnly = Py_READONLY;
#else
constexpr int kObjectMember = T_OBJECT_EX;
constexpr int kReadOnly = READONLY;
#endif

// One attribute name, read as PyObject_GetAttr would read it but without its generic lookup
// (about 200 instructions): where the object's type (generic getattr, a valid version tag) holds
// a ``__slots__`` member of that name, at the member's offset (Seen, Frame); where the type has
// no attribute of that name at all, in the instance dict (Context, the capture, the registries).
// What to do is found once per type and version (the type's MRO, _PyType_Lookup), so a class
// changed later, a subclass or a property all take the generic path: the value is Python's.
class Attr {
 public:
  explicit Attr(const char* name) : name_(interned(name)) {}

  // A new reference to obj.<name>, or throws Python's error.
  py::object get(PyObject* obj) {
    PyTypeObject* type = Py_TYPE(obj);
    if (type != reinterpret_cast<PyTypeObject*>(type_.ptr()) || type->tp_version_tag != version_) find(type);
    PyObject* v = nullptr;
    if (offset_ >= 0) {
      v = *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + offset_);  // null: unset, Python raises
    } else if (in_dict_) {
      PyObject* dict = PyObject_GenericGetDict(obj, nullptr);  // new reference
      if (dict == nullptr) throw py::error_already_set();
      v = PyDict_GetItemWithError(dict, name_);  // borrowed
      Py_XINCREF(v);
      Py_DECREF(dict);
      if (v != nullptr) return py::reinterpret_steal<py::object>(v);
      if (PyErr_Occurred()) throw py::error_already_set();
    }
    if (v != nullptr) return py::reinterpret_borrow<py::object>(v);
    v = PyObject_GetAttr(obj, name_);
    if (v == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(v);
  }

 private:
  void find(PyTypeObject* type) {
    offset_ = -1;
    in_dict_ = false;
    PyObject* found = _PyType_Lookup(type, name_);  // borrowed; also gives the type a version tag
    version_ = PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG) ? type->tp_version_tag : 0;
    type_ = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(type));  // kept: an address names one type
    if (version_ == 0 || type->tp_getattro != PyObject_GenericGetAttr) return;
    if (found != nullptr && Py_TYPE(found) == &PyMemberDescr_Type) {
      const PyMemberDef* member = reinterpret_cast<PyMemberDescrObject*>(found)->d_member;
      if (member->type == kObjectMember && (member->flags & ~kReadOnly) == 0) offset_ = member->offset;
    } else if (found == nullptr && type->tp_dictoffset != 0) {
      in_dict_ = true;
    }
  }

  PyObject* name_;
  py::object type_;
  unsigned int version_ = 0;  // 0: the type has none, nothing is cached
  Py_ssize_t offset_ = -1;
  bool in_dict_ = false;
};

bool truthy(PyObject* obj) {
  if (obj == Py_True) return true;
  if (obj == Py_False || obj == Py_None) return false;
  int t = PyObject_IsTrue(obj);
  if (t < 0) throw py::error_already_set();
  return t == 1;
}

// The module a frame or a Seen entry holds weakly (borrowed; Py_None once it died).
PyObject* referent(const py::object& ref) {
  if (!PyWeakref_Check(ref.ptr())) return nullptr;
  return PyWeakref_GetObject(ref.ptr());
}

// Equal ints (versions): by identity first, as PyObject_RichCompareBool.
bool same_value(const py::object& a, const py::object& b) {
  int same = PyObject_RichCompareBool(a.ptr(), b.ptr(), Py_EQ);
  if (same < 0) throw py::error_already_set();
  return same == 1;
}

}  // namespace

struct ModuleFastPath {
  // context: the Context; capture: its NativeCapture (the listener); phases: MODEL_PHASES;
  // registry: the formula REGISTRY (its version); python_pre / python_post: Context._module_pre /
  // _module_post as plain functions (the general case).
  ModuleFastPath(py::object context, py::object capture, py::object phases, py::object registry,
                 py::object python_pre, py::object python_post)
      : context(context), capture(capture), phases(phases), registry(registry), python_pre(python_pre),
        python_post(python_post) {
    stack = context.attr("forward_stack");  // lists the Context never rebinds
    user_phases = context.attr("user_phases");
    function_grad = context.attr("function_grad");
    seen = context.attr("seen").attr("by_id");
    changed = capture.attr("module_changed");
    act = capture.attr("_act");
    hook_grads = context.attr("_hook_grads");
    failed = context.attr("guard").attr("failed");
    watch = context.attr("module_watch");  // set before the capture starts (Meter.__enter__)
    if (!watch.is_none()) {
      watch_kinds = watch.attr("kinds").attr("by_id");
      watch_pre = watch.attr("_module_pre");
    }
    snapshot_ids = capture.attr("snapshot_ids");
    module_ids = capture.attr("module_ids");
    slot_index = capture.attr("slot").cast<int64_t>();  // the fast path lives while the capture is entered
    act_on = capture.attr("act_on").cast<int64_t>();
    python_hooks = capture.attr("python_hooks").cast<int64_t>();
  }

  void pre(PyObject* module, PyObject* args) {
    py::object name, key;
    bool grad = false, fast = false;
    bool ok = guarded("module hook", [&] {
      key = py::reinterpret_steal<py::object>(PyLong_FromVoidPtr(module));  // id(module)
      if (!key) throw py::error_already_set();
      PyObject* entry = PyDict_GetItemWithError(seen.ptr(), key.ptr());  // borrowed
      if (entry == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (entry == nullptr) return;
      py::object keep = py::reinterpret_borrow<py::object>(entry);  // the reads below run no Python, but keep it
      if (referent(seen_ref_.get(entry)) != module || !current_untagged(entry)) return;
      py::object frames = frames_.get(entry);
      if (!PyTuple_Check(frames.ptr()) || PyTuple_GET_SIZE(frames.ptr()) != 2) return;
      name = seen_name_.get(entry);
      grad = c10::GradMode::is_enabled();
      if (PyList_Append(stack.ptr(), PyTuple_GET_ITEM(frames.ptr(), grad ? 1 : 0)) < 0) throw py::error_already_set();
      fast = true;
    });
    if (!ok) {  // the guard took the failure, as Context._module_pre does; the watch still runs
      if (!watch.is_none()) watch_pre(py::handle(module), py::handle(args));
      return;
    }
    if (!fast) {
      // A first call, a model phase: Python does it all (Context._module_pre runs the watch too).
      python_pre(context, py::handle(module), py::handle(args));
      return;
    }
    // Fires once gradients for all inputs exist: the module's backward is over.
    entered(grad ? py::handle(args) : py::handle(Py_None), name, name, false);  // the module is the innermost now
    if (!watch.is_none()) watched(module, args, key);
  }

  void post(PyObject* module, PyObject* args, PyObject* output) {
    py::object name, innermost = py::none();
    bool grad = false, fast = false;
    bool ok = guarded("module hook", [&] {
      PyObject* stack_list = stack.ptr();
      Py_ssize_t size = PyList_GET_SIZE(stack_list);
      if (size == 0) return;
      py::object frame = py::reinterpret_borrow<py::object>(PyList_GET_ITEM(stack_list, size - 1));
      if (referent(frame_ref_.get(frame.ptr())) != module || truthy(tagged_.get(frame.ptr()).ptr())) return;
      name = frame_name_.get(frame.ptr());
      if (PyList_SetSlice(stack_list, size - 1, size, nullptr) < 0) throw py::error_already_set();  // pop
      if (size > 1) innermost = frame_name_.get(PyList_GET_ITEM(stack_list, size - 2));
      grad = c10::GradMode::is_enabled();
      fast = true;
    });
    if (!ok) return;
    if (!fast) {
      python_post(context, py::handle(module), py::handle(args), py::handle(output));  // frames skipped (an exception), a model phase
      return;
    }
    // Fires at the first gradient of an output: the module's backward begins.
    entered(grad ? py::handle(output) : py::handle(Py_None), name, innermost, true);
  }

 private:
  // Run ``body``; a failure goes to the Context's guard under ``kind`` (which re-raises what passes).
  template <typename F>
  bool guarded(const char* kind, F&& body) {
    try {
      body();
      return true;
    } catch (py::error_already_set& e) {
      failed(kind, e.value());
    } catch (const std::exception& e) {
      failed(kind, py::reinterpret_steal<py::object>(PyObject_CallFunction(PyExc_RuntimeError, "s", e.what())));
    }
    return false;
  }

  // The module watch (DarkModuleWatch._module_pre) where it knows the module, its class is the
  // one it knew and the frame on top is the one it last took for it: the module's class name
  // into the step's record (``ran``, or ``always_dark`` for a bypassing library's), the dict the
  // watch holds now. Everything else (a first call, a new frame, a swapped class) runs the
  // method, which takes its failures to the guard itself.
  void watched(PyObject* module, PyObject* args, const py::object& key) {
    bool python = false;
    guarded("dark module watch", [&] {
      PyObject* entry = PyDict_GetItemWithError(watch_kinds.ptr(), key.ptr());  // borrowed
      if (entry == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        python = true;
        return;
      }
      py::object keep = py::reinterpret_borrow<py::object>(entry);
      if (referent(kind_ref_.get(entry)) != module) {
        python = true;
        return;
      }
      long kind = PyLong_AsLong(kind_.get(entry).ptr());
      if (kind == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (kind == 0) return;  // no own parameters, or a lookup module
      Py_ssize_t size = PyList_GET_SIZE(stack.ptr());
      if (size == 0) return;
      PyObject* frame = PyList_GET_ITEM(stack.ptr(), size - 1);  // borrowed: the stack holds it
      if (kind_frame_.get(entry).ptr() != frame ||
          kind_cls_.get(entry).ptr() != reinterpret_cast<PyObject*>(Py_TYPE(module))) {
        python = true;
        return;
      }
      py::object record = kind == 2 ? always_dark_.get(watch.ptr()) : ran_.get(watch.ptr());
      if (!PyDict_Check(record.ptr())) throw std::runtime_error("the dark module watch's record is not a dict");
      if (PyDict_SetItem(record.ptr(), frame_name_.get(frame).ptr(), kind_cls_name_.get(entry).ptr()) < 0) {
        throw py::error_already_set();
      }
    });
    if (python) watch_pre(py::handle(module), py::handle(args));
  }

  // The Seen entry's model phase is current (MODEL_PHASES.version) and there is none.
  bool current_untagged(PyObject* entry) {
    return same_value(tag_version_.get(entry), phases_version_.get(phases.ptr())) && tag_.get(entry).is_none();
  }

  // NativeCapture.module_changed after the stack changed, then the hooks it leaves to Python.
  void entered(py::handle value, const py::object& name, py::handle innermost, bool enter) {
    py::object rest = py::reinterpret_borrow<py::object>(value);  // a failure: Python hooks it all
    guarded("context tracking", [&] { rest = module_changed(value, name, innermost, enter); });
    if (!rest.is_none()) hook_grads(rest, name, enter);  // guarded in Python
  }

  // NativeCapture.module_changed, on the interned snapshot and module ids; what they lack yet
  // (or a registry changed since) goes to the Python method. ``innermost``: the innermost
  // forward module's name now (None: none).
  py::object module_changed(py::handle value, const py::object& name, py::handle innermost, bool enter) {
    PyObject* stack_list = stack.ptr();
    Py_ssize_t size = PyList_GET_SIZE(stack_list);
    bool optimizer = truthy(optimizer_depth_.get(context.ptr()).ptr());
    Py_ssize_t phases_size = PyList_GET_SIZE(user_phases.ptr());
    PyObject* phase = phases_size > 0 ? PyList_GET_ITEM(user_phases.ptr(), phases_size - 1) : Py_None;
    bool outer = (size > 0 && truthy(grad_enabled_.get(PyList_GET_ITEM(stack_list, 0)).ptr())) ||
                 (PyList_GET_SIZE(function_grad.ptr()) > 0 && truthy(PyList_GET_ITEM(function_grad.ptr(), 0)));
    int64_t ident = registry_current() ? snapshot_id({optimizer, phase, outer, innermost.ptr()}) : -1;
    int64_t module = ident >= 0 && !value.is_none() ? module_id(name) : -1;
    if (ident < 0 || module == -2) return changed(value, name, enter);  // Python interns them
    int64_t status = module_call(slot_index, ident, optimizer, module, value, enter);
    if (status & act_on) act(status);
    return status & python_hooks ? py::reinterpret_borrow<py::object>(value) : py::object(py::none());
  }

  // REGISTRY.version is the capture's registry_version (no formula registered since it classified
  // its ops). The capture takes the registry's value when it catches up, so a version object seen
  // equal once stays so: only the registry's is read while it stays the same object.
  bool registry_current() {
    py::object version = registry_version_.get(registry.ptr());
    if (version.ptr() == current_version.ptr()) return true;
    if (!same_value(version, known_version_.get(capture.ptr()))) return false;
    current_version = version;
    return true;
  }

  // NativeCapture.module_ids[name], or -2 when Python has not interned it yet. Found there once
  // per name string (Seen and Frame hold one string per module), then here.
  int64_t module_id(const py::object& name) {
    auto it = module_cache.find(name.ptr());
    if (it != module_cache.end()) return it->second;
    PyObject* id = PyDict_GetItemWithError(module_ids.ptr(), name.ptr());  // borrowed
    if (id == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return -2;
    }
    int64_t module = PyLong_AsLongLong(id);
    kept.push_back(name);
    module_cache.emplace(name.ptr(), module);
    return module;
  }

  // Context.snapshot() as a key: (optimizer, user phase, outermost call's grad mode, innermost
  // module's name), the strings by identity (kept alive here, so an address names one string).
  struct Snapshot {
    bool optimizer;
    PyObject* phase;
    bool outer;
    PyObject* innermost;
    bool operator==(const Snapshot& o) const {
      return optimizer == o.optimizer && phase == o.phase && outer == o.outer && innermost == o.innermost;
    }
  };
  struct SnapshotHash {
    size_t operator()(const Snapshot& k) const noexcept {
      size_t h = std::hash<const void*>()(k.phase) * 31 + std::hash<const void*>()(k.innermost);
      return h * 4 + (k.optimizer ? 2 : 0) + (k.outer ? 1 : 0);
    }
  };

  // The snapshot's id in NativeCapture.snapshot_ids (which only grows), or -1 when Python has
  // not interned it yet. Found there once per distinct key, then here: no tuple per call.
  int64_t snapshot_id(const Snapshot& key) {
    auto it = snapshot_cache.find(key);
    if (it != snapshot_cache.end()) return it->second;
    py::tuple snapshot = py::make_tuple(py::bool_(key.optimizer), py::handle(key.phase), py::bool_(key.outer),
                                        py::handle(key.innermost));
    PyObject* ident = PyDict_GetItemWithError(snapshot_ids.ptr(), snapshot.ptr());  // borrowed
    if (ident == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      return -1;
    }
    int64_t id = PyLong_AsLongLong(ident);
    kept.push_back(py::reinterpret_borrow<py::object>(key.phase));
    kept.push_back(py::reinterpret_borrow<py::object>(key.innermost));
    snapshot_cache.emplace(key, id);
    return id;
  }

  py::object context, capture, phases, registry, python_pre, python_post;
  py::object stack, user_phases, function_grad, seen, changed, act, hook_grads, failed;
  py::object snapshot_ids, module_ids;  // the capture's interned ids (dicts it never rebinds)
  py::object watch = py::none(), watch_kinds, watch_pre;  // Context.module_watch, its kinds.by_id, its _module_pre
  int64_t act_on = 0, python_hooks = 0, slot_index = -1;
  std::unordered_map<Snapshot, int64_t, SnapshotHash> snapshot_cache;
  std::unordered_map<PyObject*, int64_t> module_cache;  // module name string -> its id (module_ids)
  std::vector<py::object> kept;  // the strings snapshot_cache's and module_cache's keys point to
  py::object current_version;  // the REGISTRY.version last seen equal to the capture's
  // What every call reads, one Attr per attribute of one type (each caches the type it reads):
  // Seen's slots, Frame's, MODEL_PHASES.version, the Context's, the registry's and the capture's.
  Attr seen_ref_{"ref"}, seen_name_{"name"}, frames_{"frames"}, tag_{"tag"}, tag_version_{"tag_version"};
  Attr frame_ref_{"ref"}, frame_name_{"name"}, grad_enabled_{"grad_enabled"}, tagged_{"tagged"};
  Attr phases_version_{"version"}, optimizer_depth_{"optimizer_depth"}, registry_version_{"version"},
      known_version_{"registry_version"};
  // The watch's: _Kind's slots, and its records (in its dict, rebound at each step).
  Attr kind_ref_{"ref"}, kind_{"kind"}, kind_cls_{"cls"}, kind_cls_name_{"cls_name"}, kind_frame_{"frame"};
  Attr ran_{"ran"}, always_dark_{"always_dark"};
};

namespace {

// pre and post as METH_FASTCALL builtins bound to a capsule of their ModuleFastPath: the module
// hooks call them twice per module call, and pybind's dispatcher (argument loaders, overload
// records) costs about 1,000 instructions per call on top. The capsule holds the pybind object.
constexpr const char* kCapsule = "flopcount_native.ModuleFastPath";

template <typename F>
PyObject* fast_call(PyObject* capsule, Py_ssize_t nargs, Py_ssize_t expected, const char* what, F&& body) {
  if (nargs != expected) {
    PyErr_Format(PyExc_TypeError, "ModuleFastPath.%s takes %zd arguments (%zd given)", what, expected, nargs);
    return nullptr;
  }
  auto* fast = static_cast<ModuleFastPath*>(PyCapsule_GetPointer(capsule, kCapsule));
  if (fast == nullptr) return nullptr;
  try {
    body(*fast);
  } catch (py::error_already_set& e) {  // what the guard let pass (BudgetExceeded, strict mode)
    e.restore();
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* fast_pre(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  return fast_call(capsule, nargs, 2, "pre", [&](ModuleFastPath& f) { f.pre(args[0], args[1]); });
}

PyObject* fast_post(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  return fast_call(capsule, nargs, 3, "post", [&](ModuleFastPath& f) { f.post(args[0], args[1], args[2]); });
}

PyMethodDef pre_def = {"pre", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_pre)), METH_FASTCALL,
                       "pre(module, args): Context._module_pre's common case"};
PyMethodDef post_def = {"post", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_post)),
                        METH_FASTCALL, "post(module, args, output): Context._module_post's common case"};

void release_capsule(PyObject* capsule) {
  Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(capsule)));
}

// A builtin calling ``def`` on ``self``'s ModuleFastPath; it keeps ``self`` alive.
py::object fast_method(PyMethodDef* def, py::object self) {
  auto* fast = self.cast<ModuleFastPath*>();
  py::object capsule = py::reinterpret_steal<py::object>(PyCapsule_New(fast, kCapsule, release_capsule));
  if (!capsule) throw py::error_already_set();
  if (PyCapsule_SetContext(capsule.ptr(), self.ptr()) != 0) throw py::error_already_set();
  Py_INCREF(self.ptr());  // released with the capsule
  PyObject* fn = PyCFunction_New(def, capsule.ptr());
  if (fn == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(fn);
}

}  // namespace

void bind_module_fast_path(py::module_& m) {
  py::class_<ModuleFastPath>(m, "ModuleFastPath",
                             "The module hooks' common case for a Context with the native backend (hooks.cpp)")
      .def(py::init<py::object, py::object, py::object, py::object, py::object, py::object>())
      .def_property_readonly("pre", [](py::object self) { return fast_method(&pre_def, self); },
                             "pre(module, args), a builtin bound to this fast path")
      .def_property_readonly("post", [](py::object self) { return fast_method(&post_def, self); },
                             "post(module, args, output), a builtin bound to this fast path");
}

}  // namespace flopcount_native
