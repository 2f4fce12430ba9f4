// flopcount native capture: an at::RecordFunction observer that sees every aten op at the
// dispatcher without running Python, and aggregates one compact key per distinct call:
//   [op id, context id, flags (grad mode, in backward), backward module id, inputs..., outputs...]
// The FLOP formulas stay in the one Python registry: flopcount/capture/native.py evaluates them
// once per distinct key when a step closes. Compile with -DNDEBUG, like libtorch: without it the
// RecordFunction layout differs from libtorch's and inputs() fails a debug assertion.
//
// One observer per active meter (a slot), registered as a thread-local callback: like a
// TorchDispatchMode it follows the meter's thread and the autograd work it starts (autograd's
// worker threads inherit the thread-local state), and nested meters each count their block.
//
// Which ops are counted mirrors what a TorchDispatchMode (the dispatch backend) sees:
//   * an op is "seen" when it reaches a kernel below autograd. CompositeImplicitAutograd ops
//     decompose above that point while an autograd key is active (so their parts are seen
//     instead); under inference mode they are seen themselves.
//   * ops called from inside a seen op's kernel (autocast's re-call, native kernels calling other
//     ops) are not seen: a thread-local depth counts open seen ops.
//   * tensor-subclass wrappers (Python dispatch key, e.g. DTensor) are transparent: the subclass
//     runs its local ops, which are seen with local shapes; the wrapper op with global shapes not.
// Ops whose FLOPs depend on tensor values (varlen offsets, grouped GEMM offsets) put small integer
// tensors' values into the key: read on the host for CPU tensors, and for device tensors copied
// asynchronously to pinned host memory behind an event (no host-device synchronisation).

#include <torch/extension.h>
#include <torch/version.h>

// RecordFunction::overload_name() and FunctionPreHook's const compiled_args() came with torch 2.7
// (flopcount/capture/native.py checks this before building; older torch uses the dispatch backend).
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 7)
#error "flopcount's native backend needs torch >= 2.7"
#endif

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/Event.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <utility>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// Key tags (the Python decoder in flopcount/capture/native.py mirrors them).
enum Tag : int64_t {
  kNone = 0, kTensor = 1, kInt = 2, kDouble = 3, kBool = 4, kString = 5, kIntList = 6,
  kDoubleList = 7, kBoolList = 8, kList = 9, kDtype = 10, kOpaque = 11, kValues = 12,
  kPendingValues = 13, kTensorDtype = 14,
};
// What a key keeps of a tensor beyond its shape: nothing, small integer tensors' values
// (value-dependent formulas), or its dtype (communication payload bytes).
enum Extra { kShapeOnly = 0, kWithValues = 1, kWithDtype = 2 };
constexpr int64_t kOutputs = -1;       // separates inputs from outputs in a key
constexpr int64_t kMaxValues = 65536;  // larger integer tensors are not read (shapes only)

// What set_context / module_call return (bits; capture/native.py reads them from the module's
// STATUS_* attributes): strict mode found an uncounted op, an automatic step boundary was crossed
// since the last drain, Python must place the module's gradient hooks itself.
constexpr int64_t kViolation = 1, kBoundary = 2, kPythonHooks = 4;

// Registry classes pushed from Python.
enum Klass : int8_t {
  kUnknown = -1, kZero = 0, kFormula = 1, kUncounted = 2, kFormulaValues = 3, kCollective = 4,
};

struct OpInfo {
  std::string name, overload;
  int64_t id = 0;
  bool is_op = false;                  // a dispatcher op (not a named range such as autograd's)
  bool implicit = false;               // CompositeImplicitAutograd without an overriding kernel
  size_t num_returns = 0;
  std::vector<uint8_t> dtype_arg;      // argument i is a ScalarType (IValue holds an int)
  std::vector<uint8_t> no_values;      // argument i is an RNG seed/offset: never read its values
  std::vector<c10::optional<c10::IValue>> defaults;
  int8_t klass = kUnknown;
  int64_t klass_version = -1;
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    return static_cast<size_t>(h);
  }
};

using Table = std::unordered_map<std::vector<int64_t>, int64_t, KeyHash>;

struct Generation {
  std::unordered_map<int64_t, int64_t> calls;      // key id -> calls
  std::unordered_map<int64_t, int64_t> uncounted;  // op id -> calls
};

struct PendingValues {  // a device tensor's values on their way to pinned host memory
  at::Tensor host;
  std::unique_ptr<c10::Event> ready;
};

// Shared by every meter: op descriptions, interned strings, the registry's classification.
struct State {
  std::mutex mu;
  std::vector<std::unique_ptr<OpInfo>> ops;                  // by id; never freed
  std::unordered_map<const char*, OpInfo*> ops_by_name_ptr;  // fast path
  std::unordered_map<std::string, OpInfo*> ops_by_name;      // "name.overload"
  std::unordered_map<std::string, int64_t> string_ids;
  std::vector<std::string> strings;
  // registry classification: "ns::name" + "\x1f" + overload ("*" = every overload)
  std::unordered_map<std::string, int8_t> classes;
  std::vector<std::string> zero_namespaces;
  std::vector<std::string> collective_namespaces;  // their known-zero ops are communication
  std::vector<std::string> not_communication;      // ... except these op names
  std::atomic<int64_t> registry_version{0};
};

State& state() {
  static State* s = new State();  // leaked on purpose: callbacks may run during interpreter exit
  return *s;
}

// One per active meter (nested meters each count their block). The callback is thread-local,
// like a TorchDispatchMode: it follows the meter's thread and autograd's workers for it (they
// inherit the thread-local state), not threads the program starts itself.
struct Slot {
  std::mutex mu;  // guards everything below except the atomics
  std::deque<Generation> generations{1};
  // Keys get ids that stay valid across drains, so that Python sees each distinct key once and
  // afterwards only (id, calls). Keys naming device-value copies are per drain: never interned.
  Table key_ids;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> new_keys;  // since the last drain
  int64_t next_key_id = 0;
  bool keys_reset = false;  // key_ids was cleared (too many distinct keys): Python forgets ids
  // By key id: Python has booked the key with a plan it keeps (set_planned), so drain hands its
  // calls over apart from the rest: a steady step's planned calls repeat and are reused whole.
  std::vector<uint8_t> planned;
  std::vector<PendingValues> pending_values;
  // Backward modules, per autograd graph task: module ids, innermost last (see backward_enter).
  std::unordered_map<int64_t, std::vector<int64_t>> backward_stacks;
  std::vector<std::string> module_names;  // by module id, as Python names them
  int64_t root_module = -1;               // the id of the outermost module's name, once named
  std::string violation;                                  // strict mode: first uncounted op
  c10::optional<at::CallbackHandle> handle;
  bool in_use = false;

  std::atomic<int64_t> context{0};
  std::atomic<bool> optimizer{false};
  std::atomic<bool> pending_boundary{false};
  std::atomic<bool> boundary_crossed{false};  // a step boundary was opened since the last drain
  std::atomic<bool> strict{false};
  std::atomic<bool> has_violation{false};
  std::atomic<bool> has_backward_modules{false};
  std::atomic<bool> paused{false};  // while Python books a step (its own tensor ops are not the job's)
  std::atomic<int64_t> generation{0};  // bumped per meter: gradient hooks of an earlier meter do nothing
};

constexpr int kSlots = 8;

Slot& slot(int64_t i) {
  static Slot* slots = new Slot[kSlots];  // leaked on purpose, as state()
  TORCH_CHECK(i >= 0 && i < kSlots, "flopcount: no native meter slot ", i);
  return slots[i];
}

// The innermost backward module of graph task ``task`` (see backward_event), or -1; s.mu held.
int64_t innermost_backward_locked(const Slot& s, int64_t task) {
  auto it = s.backward_stacks.find(task);
  return it == s.backward_stacks.end() || it->second.empty() ? -1 : it->second.back();
}

thread_local int64_t tls_depth[kSlots] = {};
constexpr size_t kMaxCachedPointers = 1 << 16;  // bounds the op caches should pointers churn
constexpr size_t kMaxKeys = 100000;              // distinct keys remembered across drains
thread_local bool tls_per_drain = false;         // the key being built references a copy
// The key being built. Seen ops do not nest (ops inside one are not seen), so one buffer per
// thread and meter suffices; it keeps its capacity, so building a key allocates nothing.
thread_local std::vector<int64_t> tls_key[kSlots];

struct OpContext : at::ObserverContext {
  int64_t index = 0;  // meter slot
  bool record = false;
  bool per_drain = false;  // the key names this drain's device-value copies
  size_t num_returns = 0;
  Extra extra = kShapeOnly;
};

int64_t intern_string(State& s, const std::string& text) {  // caller holds s.mu
  auto it = s.string_ids.find(text);
  if (it != s.string_ids.end()) return it->second;
  int64_t id = static_cast<int64_t>(s.strings.size());
  s.strings.push_back(text);
  s.string_ids.emplace(text, id);
  return id;
}

bool is_scalar_type(const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::ScalarTypeType) return true;
  if (auto opt = type->cast<c10::OptionalType>()) {
    return opt->getElementType()->kind() == c10::TypeKind::ScalarTypeType;
  }
  return false;
}

std::unique_ptr<OpInfo> describe_op(const at::RecordFunction& fn) {
  auto info = std::make_unique<OpInfo>();
  info->name = fn.name();
  info->overload = fn.overload_name();
  auto handle = c10::Dispatcher::singleton().findOp(c10::OperatorName(info->name, info->overload));
  if (!handle) return info;
  info->is_op = true;
  using K = c10::DispatchKey;
  bool overridden = handle->hasKernelForAnyDispatchKey(c10::DispatchKeySet({
      K::AutogradCPU, K::AutogradCUDA, K::Autograd, K::CompositeExplicitAutograd,
      K::CompositeExplicitAutogradNonFunctional, K::CPU, K::CUDA}));
  info->implicit = handle->hasKernelForDispatchKey(K::CompositeImplicitAutograd) && !overridden;
  info->num_returns = handle->schema().returns().size();
  for (const auto& arg : handle->schema().arguments()) {
    info->dtype_arg.push_back(is_scalar_type(arg.type()) ? 1 : 0);
    const auto& name = arg.name();
    bool rng = name.find("philox") != std::string::npos || name.find("seed") != std::string::npos ||
               name.find("rng") != std::string::npos;
    info->no_values.push_back(rng ? 1 : 0);
    info->defaults.push_back(arg.default_value());
  }
  return info;
}

int8_t classify(State& s, const OpInfo& info) {  // caller holds s.mu
  auto find = [&](const std::string& overload) -> int8_t {
    auto it = s.classes.find(info.name + "\x1f" + overload);
    return it == s.classes.end() ? kUnknown : it->second;
  };
  auto contains = [](const std::vector<std::string>& list, const std::string& item) {
    for (const auto& e : list) {
      if (e == item) return true;
    }
    return false;
  };
  auto sep = info.name.find("::");
  std::string ns = sep == std::string::npos ? info.name : info.name.substr(0, sep);
  std::string base = sep == std::string::npos ? info.name : info.name.substr(sep + 2);
  int8_t klass = find(info.overload.empty() ? "default" : info.overload);
  if (klass == kUnknown) klass = find("*");
  if (klass == kUnknown) klass = contains(s.zero_namespaces, ns) ? kZero : kUncounted;
  if (klass == kZero && contains(s.collective_namespaces, ns) && !contains(s.not_communication, base)) {
    return kCollective;
  }
  return klass;
}

// Op info for a call, cached by the schema's name pointer (stable while the op is registered;
// the name is compared too in case a deregistered op's memory is reused).
OpInfo* op_info_locked(State& s, const at::RecordFunction& fn) {
  const char* name = fn.name();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.ops_by_name_ptr.find(name);
  OpInfo* info = nullptr;
  const char* overload = fn.overload_name();
  if (it != s.ops_by_name_ptr.end() && it->second->name == name && it->second->overload == overload) {
    info = it->second;
  } else {
    std::string full = std::string(name) + "." + overload;
    auto found = s.ops_by_name.find(full);
    if (found != s.ops_by_name.end()) {
      info = found->second;
    } else {
      auto fresh = describe_op(fn);
      fresh->id = static_cast<int64_t>(s.ops.size());
      info = fresh.get();
      s.ops.push_back(std::move(fresh));
      s.ops_by_name.emplace(full, info);
    }
    if (s.ops_by_name_ptr.size() > kMaxCachedPointers) s.ops_by_name_ptr.clear();
    s.ops_by_name_ptr[name] = info;
  }
  if (info->klass_version != s.registry_version.load()) {
    info->klass = classify(s, *info);
    info->klass_version = s.registry_version.load();
  }
  return info;
}

// Per-thread cache in front of op_info_locked: no lock on the hot path. Keyed by the schema's
// name pointer, which is stable; named ranges (autograd's "autograd::engine::evaluate_function:
// MulBackward0") live in transient strings, so they are recognised by their space and not cached.
thread_local std::unordered_map<const char*, OpInfo*> tls_ops;

OpInfo* not_an_op() {
  static OpInfo* info = new OpInfo();  // is_op = false
  return info;
}

OpInfo* op_info(State& s, const at::RecordFunction& fn) {
  const char* name = fn.name();
  auto it = tls_ops.find(name);
  if (it != tls_ops.end()) {
    OpInfo* info = it->second;
    if (info->klass_version == s.registry_version.load(std::memory_order_relaxed) &&
        std::strcmp(info->name.c_str(), name) == 0 &&
        std::strcmp(info->overload.c_str(), fn.overload_name()) == 0) {
      return info;
    }
  }
  if (std::strchr(name, ' ') != nullptr) return not_an_op();
  OpInfo* info = op_info_locked(s, fn);
  if (tls_ops.size() > kMaxCachedPointers) tls_ops.clear();
  tls_ops[name] = info;
  return info;
}

void add_keys(c10::DispatchKeySet& keys, const c10::IValue& v) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (t.defined()) keys = keys | t.key_set();
  } else if (v.isTensorList()) {
    for (const auto& t : v.toTensorList()) keys = keys | static_cast<at::Tensor>(t).key_set();
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) {
      if (e.isTensor() && e.toTensor().defined()) keys = keys | e.toTensor().key_set();
    }
  }
}

void encode_values(Slot& s, const at::Tensor& t, std::vector<int64_t>& key) {
  if (!c10::isIntegralType(t.scalar_type(), /*includeBool=*/false) || t.numel() > kMaxValues) return;
  at::DisableRecordFunctionGuard no_observers;  // our own copies must not be observed
  if (t.device().is_cpu()) {
    auto values = t.to(at::kLong).contiguous();
    const int64_t* data = values.const_data_ptr<int64_t>();
    key.push_back(kValues);
    key.push_back(values.numel());
    key.insert(key.end(), data, data + values.numel());
    return;
  }
  // Device tensor: copy asynchronously to pinned memory on the current stream; the values are
  // read when the step is drained, once the copy's event has completed.
  auto host = at::empty(t.sizes(), at::TensorOptions().dtype(t.scalar_type()).pinned_memory(true));
  host.copy_(t, /*non_blocking=*/true);
  c10::impl::VirtualGuardImpl impl(t.device().type());
  auto ready = std::make_unique<c10::Event>(t.device().type());
  ready->record(impl.getStream(t.device()));
  std::lock_guard<std::mutex> lock(s.mu);
  key.push_back(kPendingValues);
  key.push_back(static_cast<int64_t>(s.pending_values.size()));
  tls_per_drain = true;
  s.pending_values.push_back(PendingValues{std::move(host), std::move(ready)});
}

void encode_tensor(Slot& s, const at::Tensor& t, std::vector<int64_t>& key, Extra extra) {
  if (!t.defined()) {
    key.push_back(kNone);
    return;
  }
  if (t.is_nested()) {
    key.push_back(kOpaque);
    return;
  }
  key.push_back(kTensor);
  key.push_back(t.dim());
  if (t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
    for (auto size : t.sym_sizes()) key.push_back(size.guard_int(__FILE__, __LINE__));
  } else {
    for (auto size : t.sizes()) key.push_back(size);
  }
  if (extra == kWithValues) encode_values(s, t, key);
  if (extra == kWithDtype) {
    key.push_back(kTensorDtype);
    key.push_back(static_cast<int64_t>(t.scalar_type()));
  }
}

void encode(Slot& s, const c10::IValue& v, std::vector<int64_t>& key, Extra extra, bool dtype) {
  if (v.isTensor()) {
    encode_tensor(s, v.toTensor(), key, extra);
  } else if (v.isNone()) {
    key.push_back(kNone);
  } else if (v.isInt()) {
    key.push_back(dtype ? kDtype : kInt);
    key.push_back(v.toInt());
  } else if (v.isDouble()) {
    double d = v.toDouble();
    int64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    key.push_back(kDouble);
    key.push_back(bits);
  } else if (v.isBool()) {
    key.push_back(kBool);
    key.push_back(v.toBool());
  } else if (v.isString()) {
    State& shared = state();
    std::lock_guard<std::mutex> lock(shared.mu);
    key.push_back(kString);
    key.push_back(intern_string(shared, v.toStringRef()));
  } else if (v.isIntList()) {
    auto list = v.toIntList();
    key.push_back(kIntList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (int64_t e : list) key.push_back(e);
  } else if (v.isDoubleList()) {
    auto list = v.toDoubleList();
    key.push_back(kDoubleList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (double e : list) {
      int64_t bits;
      std::memcpy(&bits, &e, sizeof bits);
      key.push_back(bits);
    }
  } else if (v.isBoolList()) {
    auto list = v.toBoolList();
    key.push_back(kBoolList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (bool e : list) key.push_back(e);
  } else if (v.isTensorList()) {
    auto list = v.toTensorList();
    key.push_back(kList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (const auto& t : list) encode_tensor(s, t, key, extra);
  } else if (v.isList() || v.isTuple()) {
    auto elems = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
    key.push_back(kList);
    key.push_back(static_cast<int64_t>(elems.size()));
    for (const auto& e : elems) encode(s, e, key, extra, false);
  } else {  // devices, generators, layouts, symbolic values: formulas do not read them
    key.push_back(kOpaque);
  }
}

bool is_default(const OpInfo& info, size_t i, const c10::IValue& v) {
  if (i >= info.defaults.size() || !info.defaults[i].has_value()) return false;
  if (v.isTensor() && v.toTensor().defined()) return false;
  return *info.defaults[i] == v;
}

std::unique_ptr<at::ObserverContext> on_start(int64_t index, const at::RecordFunction& fn) {
  int64_t& depth = tls_depth[index];
  if (depth > 0) return nullptr;  // inside a seen op's kernel
  Slot& s = slot(index);
  if (s.paused.load(std::memory_order_relaxed)) return nullptr;
  OpInfo* info = op_info(state(), fn);
  if (!info->is_op) return nullptr;
  auto inputs = fn.inputs();
  c10::DispatchKeySet keys;
  for (const auto& v : inputs) add_keys(keys, v);
  if (keys.has(c10::DispatchKey::Python)) return nullptr;  // subclass wrapper: transparent
  if (keys.has(c10::DispatchKey::Meta)) return nullptr;    // shape propagation: nothing computed
  if (info->implicit) {
    auto tls = c10::impl::tls_local_dispatch_key_set();
    auto effective = (keys | tls.included_) - tls.excluded_;
    if (effective.has_any(c10::autograd_dispatch_keyset)) return nullptr;  // decomposes
  }
  ++depth;
  auto ctx = std::make_unique<OpContext>();
  ctx->index = index;
  int8_t klass = info->klass;
  if (klass == kZero) return ctx;
  if (klass == kUncounted) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.generations.back().uncounted[info->id] += 1;
    if (s.strict.load() && !s.has_violation.load()) {
      s.violation = info->name + (info->overload.empty() ? "" : "." + info->overload);
      s.has_violation.store(true);
    }
    return ctx;
  }
  bool optimizer = s.optimizer.load(std::memory_order_relaxed);
  if (klass != kCollective && s.pending_boundary.load(std::memory_order_relaxed) && !optimizer) {
    // Auto steps: the first op with a formula after optimizer.step() opens the next step.
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.pending_boundary.exchange(false)) {
      s.generations.emplace_back();
      s.boundary_crossed.store(true);
    }
  }
  int64_t task = torch::autograd::get_current_graph_task_id();
  int64_t module = -1;
  if (task != -1 && s.has_backward_modules.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> lock(s.mu);
    module = innermost_backward_locked(s, task);
  }
  auto& key = tls_key[index];
  key.clear();
  tls_per_drain = false;
  key.push_back(info->id);
  key.push_back(s.context.load(std::memory_order_relaxed));
  key.push_back((c10::GradMode::is_enabled() ? 1 : 0) | (task != -1 ? 2 : 0));
  key.push_back(module);
  ctx->extra = klass == kFormulaValues ? kWithValues : klass == kCollective ? kWithDtype : kShapeOnly;
  for (size_t i = 0; i < inputs.size(); ++i) {
    key.push_back(is_default(*info, i, inputs[i]) ? 1 : 0);
    Extra extra = ctx->extra;
    if (extra == kWithValues && i < info->no_values.size() && info->no_values[i]) extra = kShapeOnly;
    encode(s, inputs[i], key, extra, i < info->dtype_arg.size() && info->dtype_arg[i]);
  }
  ctx->record = true;
  ctx->per_drain = tls_per_drain;
  ctx->num_returns = info->num_returns;
  return ctx;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* observer_ctx) {
  if (observer_ctx == nullptr) return;
  auto* ctx = static_cast<OpContext*>(observer_ctx);
  --tls_depth[ctx->index];
  if (!ctx->record) return;
  // No outputs from an op that returns something: it threw before its kernel ran (e.g.
  // non-reentrant checkpoint stops recomputing from autograd's saved-tensor hook). Not counted.
  if (ctx->num_returns > 0 && fn.outputs().empty()) return;
  Slot& s = slot(ctx->index);
  auto& key = tls_key[ctx->index];
  key.push_back(kOutputs);
  Extra extra = ctx->extra == kWithDtype ? kWithDtype : kShapeOnly;
  for (const auto& out : fn.outputs()) encode(s, out, key, extra, false);
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t id;
  if (ctx->per_drain) {
    id = s.next_key_id++;
    s.new_keys.emplace_back(id, key);
  } else {
    auto it = s.key_ids.find(key);
    if (it != s.key_ids.end()) {
      id = it->second;
    } else {
      if (s.key_ids.size() >= kMaxKeys) {  // shapes that never repeat: start afresh
        s.key_ids.clear();
        s.keys_reset = true;
        s.planned.clear();
      }
      id = s.next_key_id++;
      s.key_ids.emplace(key, id);
      s.new_keys.emplace_back(id, key);
    }
  }
  s.generations.back().calls[id] += 1;
}

// RecordFunction takes plain function pointers: one start function per slot.
template <int64_t I>
std::unique_ptr<at::ObserverContext> on_start_slot(const at::RecordFunction& fn) {
  return on_start(I, fn);
}

template <size_t... I>
constexpr std::array<at::RecordFunctionCallback::StartCallback, sizeof...(I)> start_table(
    std::index_sequence<I...>) {
  return {&on_start_slot<static_cast<int64_t>(I)>...};
}

// ---- Python interface ------------------------------------------------------------------------

// Turn a meter's observer on for this thread (and autograd work it starts); returns its slot.
int64_t enable(bool strict) {
  static const auto starts = start_table(std::make_index_sequence<kSlots>{});
  for (int64_t i = 0; i < kSlots; ++i) {
    Slot& s = slot(i);
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.in_use) continue;
    s.in_use = true;
    s.generations.clear();
    s.generations.emplace_back();
    s.pending_values.clear();
    s.key_ids.clear();
    s.new_keys.clear();
    s.next_key_id = 0;
    s.keys_reset = false;
    s.planned.clear();
    s.backward_stacks.clear();
    s.module_names.clear();
    s.root_module = -1;
    s.has_backward_modules = false;
    s.generation.fetch_add(1);
    s.violation.clear();
    s.has_violation = false;
    s.pending_boundary = false;
    s.boundary_crossed = false;
    s.optimizer = false;
    s.context = 0;
    s.strict = strict;
    s.handle = at::addThreadLocalCallback(at::RecordFunctionCallback(starts[i], on_end)
                                              .needsInputs(true)
                                              .needsOutputs(true)
                                              .scopes({at::RecordScope::FUNCTION}));
    return i;
  }
  TORCH_CHECK(false, "flopcount: more than ", kSlots, " nested native meters");
}

// Turn the observer off (on the thread that enabled it); drain() still returns what it holds.
void disable(int64_t index) {
  Slot& s = slot(index);
  c10::optional<at::CallbackHandle> handle;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    handle.swap(s.handle);
  }
  if (handle.has_value()) at::removeCallback(*handle);
}

void release(int64_t index) {
  disable(index);
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  s.generations.clear();
  s.generations.emplace_back();
  s.pending_values.clear();
  s.key_ids.clear();
  s.new_keys.clear();
  s.planned.clear();
  s.backward_stacks.clear();
  s.has_backward_modules = false;
  s.generation.fetch_add(1);
  s.in_use = false;
}

void set_registry(const std::vector<std::tuple<std::string, std::string, int64_t>>& entries,
                  const std::vector<std::string>& zero_namespaces,
                  const std::vector<std::string>& collective_namespaces,
                  const std::vector<std::string>& not_communication) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.classes.clear();
  for (const auto& [name, overload, klass] : entries) {
    s.classes[name + "\x1f" + overload] = static_cast<int8_t>(klass);
  }
  s.zero_namespaces = zero_namespaces;
  s.collective_namespaces = collective_namespaces;
  s.not_communication = not_communication;
  s.registry_version.fetch_add(1);
}

// Python-side context changed (module, optimizer, user phase). Returns what Python should act
// on promptly: 1 when strict mode found an uncounted op, 2 when an automatic step boundary was
// crossed since the last drain (Python books the finished step then).
int64_t set_context(int64_t index, int64_t context, bool optimizer) {
  Slot& s = slot(index);
  s.context.store(context);
  s.optimizer.store(optimizer);
  return (s.has_violation.load() ? kViolation : 0) | (s.boundary_crossed.load() ? kBoundary : 0);
}

// ---- backward modules ---------------------------------------------------------------------------
// The same rules as flopcount/capture/context.py (Context._backward_enter/_leave), kept here so that
// gradient hooks run no Python: a module's backward begins at the first gradient of its outputs
// and ends once the gradients of all its inputs exist.

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
}

void leave_locked(Slot& s, int64_t task, int64_t module) {
  auto it = s.backward_stacks.find(task);
  if (it == s.backward_stacks.end()) return;
  auto& stack = it->second;
  for (size_t i = stack.size(); i > 0; --i) {
    if (stack[i - 1] == module) {
      stack.erase(stack.begin() + static_cast<std::ptrdiff_t>(i - 1));
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

// The same, from a Python hook (tensors from several nodes, or leaves).
void backward_event(int64_t index, int64_t module, bool enter) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  backward_event_locked(s, module, enter);
}

// A pre-hook on an autograd node: it runs when the node is about to run, i.e. once the node's
// gradients are complete, and dies with the graph.
struct ModuleHook : torch::autograd::FunctionPreHook {
  ModuleHook(int64_t index, int64_t generation, int64_t module, bool enter)
      : index(index), generation(generation), module(module), enter(enter) {}

  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    Slot& s = slot(index);
    if (s.generation.load() != generation) return grads;  // its meter has ended
    std::lock_guard<std::mutex> lock(s.mu);
    backward_event_locked(s, module, enter);
    return grads;
  }

  // Compiled autograd asks every hook to register itself; this one only tracks modules for
  // eager backward, so under compiled autograd it stays out (instead of failing the backward).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const override {}

  int64_t index, generation, module;
  bool enter;
};

// Hook the node that made ``tensor``: module ``module`` enters backward there (``enter``) or
// leaves it. False when the tensor has no node (a leaf): Python takes that case.
bool add_module_hook(int64_t index, const at::Tensor& tensor, int64_t module, bool enter) {
  const auto& node = tensor.grad_fn();
  if (!node) return false;
  Slot& s = slot(index);
  node->add_pre_hook(std::make_unique<ModuleHook>(index, s.generation.load(), module, enter));
  return true;
}

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

int64_t module_call(int64_t index, int64_t context, bool optimizer, int64_t module, py::handle value,
                    bool enter) {
  int64_t status = set_context(index, context, optimizer);
  if (value.is_none()) return status;
  Grads g;
  grads_of(value.ptr(), g);
  if (g.python) return status | kPythonHooks;
  if (g.node) {
    Slot& s = slot(index);
    g.node->add_pre_hook(std::make_unique<ModuleHook>(index, s.generation.load(), module, enter));
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
  s.has_backward_modules = false;
}

void set_paused(int64_t index, bool paused) { slot(index).paused.store(paused); }

void mark_pending_boundary(int64_t index, bool pending) { slot(index).pending_boundary.store(pending); }

std::string take_violation(int64_t index) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  std::string out;
  out.swap(s.violation);
  s.has_violation = false;
  return out;
}

// Python keeps a plan for these key ids (or, with ``planned`` false, for none of its keys anymore).
void set_planned(int64_t index, const std::vector<int64_t>& ids, bool planned) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  if (!planned) {
    s.planned.clear();
    return;
  }
  for (int64_t id : ids) {
    if (id < 0) continue;
    if (s.planned.size() <= static_cast<size_t>(id)) s.planned.resize(static_cast<size_t>(id) + 1, 0);
    s.planned[static_cast<size_t>(id)] = 1;
  }
}

// Everything aggregated since the last drain: one entry per generation (auto-step boundaries),
// ({planned key id: calls}, {other key id: calls}, {op id: uncounted calls}), planned keys being
// those of set_planned; the keys first seen since the last drain
// ({key id: key}); the values of device tensors copied for value-dependent formulas
// ({slot: [values]}); whether earlier key ids were forgotten. Waiting on a copy's event blocks only until that
// copy is done (the copies are queued early in the step); it does not synchronise the device.
py::tuple drain(int64_t index) {
  Slot& s = slot(index);
  std::deque<Generation> generations;
  std::vector<PendingValues> pending;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> new_keys;
  bool reset = false;
  std::vector<std::vector<uint8_t>> is_planned;  // per generation, in its calls' iteration order
  {
    std::lock_guard<std::mutex> lock(s.mu);
    generations.swap(s.generations);
    for (const auto& gen : generations) {
      auto& flags = is_planned.emplace_back();
      flags.reserve(gen.calls.size());
      for (const auto& entry : gen.calls) {
        auto id = static_cast<size_t>(entry.first);
        flags.push_back(id < s.planned.size() ? s.planned[id] : 0);
      }
    }
    s.generations.emplace_back();
    pending.swap(s.pending_values);
    new_keys.swap(s.new_keys);
    std::swap(reset, s.keys_reset);
    s.boundary_crossed = false;
  }
  py::dict values;
  at::DisableRecordFunctionGuard no_observers;  // the copies below are not the job's ops
  {
    py::gil_scoped_release no_gil;  // event waits must not hold the GIL
    for (auto& p : pending) {
      p.ready->synchronize();
    }
  }
  for (size_t slot = 0; slot < pending.size(); ++slot) {
    auto host = pending[slot].host.to(at::kLong).contiguous();
    const int64_t* data = host.const_data_ptr<int64_t>();
    values[py::int_(slot)] = std::vector<int64_t>(data, data + host.numel());
  }
  py::list out;
  for (size_t g = 0; g < generations.size(); ++g) {
    py::dict repeated, other;
    size_t i = 0;
    for (const auto& [id, calls] : generations[g].calls) {  // the order in which is_planned was filled
      (is_planned[g][i++] ? repeated : other)[py::int_(id)] = py::int_(calls);
    }
    out.append(py::make_tuple(repeated, other, py::cast(generations[g].uncounted)));
  }
  py::dict keys;
  for (auto& [id, key] : new_keys) keys[py::int_(id)] = py::tuple(py::cast(key));
  return py::make_tuple(out, keys, values, reset);
}

// (name, overload) of each op id seen so far; strings by id.
std::vector<std::pair<std::string, std::string>> op_names(int64_t start) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t i = static_cast<size_t>(start); i < s.ops.size(); ++i) {
    out.emplace_back(s.ops[i]->name, s.ops[i]->overload);
  }
  return out;
}

std::vector<std::string> strings(int64_t start) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  return std::vector<std::string>(s.strings.begin() + start, s.strings.end());
}

int64_t dtype_code(const at::Tensor& t) { return static_cast<int64_t>(t.scalar_type()); }

// ---- benchmark instrument: the RecordFunction machinery alone ----------------------------------
// An observer registered like a meter's (thread-local, inputs and outputs, aten ops) whose
// callbacks do nothing: what any RecordFunction-based capture pays before it does any work
// (benchmarks/interleaved_step_overhead.py, variant observer_floor).
std::unique_ptr<at::ObserverContext> floor_start(const at::RecordFunction&) { return nullptr; }
void floor_end(const at::RecordFunction&, at::ObserverContext*) {}

c10::optional<at::CallbackHandle>& floor_handle() {
  static c10::optional<at::CallbackHandle> handle;
  return handle;
}

void floor_enable() {
  TORCH_CHECK(!floor_handle().has_value(), "flopcount: the observer floor is already on");
  floor_handle() = at::addThreadLocalCallback(at::RecordFunctionCallback(floor_start, floor_end)
                                                  .needsInputs(true)
                                                  .needsOutputs(true)
                                                  .scopes({at::RecordScope::FUNCTION}));
}

void floor_disable() {
  if (!floor_handle().has_value()) return;
  at::removeCallback(*floor_handle());
  floor_handle().reset();
}


}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flopcount native capture: RecordFunction observer aggregating op keys in C++";
  m.def("enable", &enable);
  m.def("disable", &disable);
  m.def("release", &release);
  m.def("set_registry", &set_registry);
  m.def("set_context", &set_context);
  m.def("backward_event", &backward_event);
  m.def("add_module_hook", &add_module_hook);
  m.def("module_call", &module_call);
  m.def("backward_module", &backward_module);
  m.def("set_module_name", &set_module_name);
  m.def("clear_backward_modules", &clear_backward_modules);
  m.def("mark_pending_boundary", &mark_pending_boundary);
  m.def("set_paused", &set_paused);
  m.def("take_violation", &take_violation);
  m.def("drain", &drain);
  m.def("set_planned", &set_planned);
  m.def("op_names", &op_names, py::arg("start") = 0);
  m.def("strings", &strings, py::arg("start") = 0);
  m.def("dtype_code", &dtype_code);
  m.def("floor_enable", &floor_enable);
  m.def("floor_disable", &floor_disable);
  m.attr("KEY_VERSION") = 1;
  m.attr("STATUS_VIOLATION") = kViolation;
  m.attr("STATUS_BOUNDARY") = kBoundary;
  m.attr("STATUS_PYTHON_HOOKS") = kPythonHooks;
  m.attr("SLOTS") = kSlots;
}
