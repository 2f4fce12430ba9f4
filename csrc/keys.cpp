// The key encoder: op descriptions (cached per thread) and each argument as tagged int64 values.
// Ops whose FLOPs depend on tensor values (varlen offsets, grouped GEMM offsets) put small integer
// tensors' values into the key: read on the host for CPU tensors, and for device tensors copied
// asynchronously to pinned host memory behind an event (no host-device synchronisation).

#include "native.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstring>

namespace flopcount_native {

State& state() {
  static State* s = new State();  // leaked on purpose: callbacks may run during interpreter exit
  return *s;
}

namespace {

constexpr size_t kMaxCachedPointers = 1 << 16;  // bounds the op caches should pointers churn

int64_t intern_string_locked(State& s, const std::string& text) {
  auto it = s.string_ids.find(text);
  if (it != s.string_ids.end()) return it->second;
  int64_t id = static_cast<int64_t>(s.strings.size());
  s.strings.push_back(text);
  s.string_ids.emplace(text, id);
  return id;
}

// String arguments (einsum's equation, reduction modes) repeat: the thread's cache answers them.
int64_t intern_string(ThreadTable& table, const std::string& text) {
  auto it = table.string_ids.find(text);
  if (it != table.string_ids.end()) return it->second;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t id = intern_string_locked(s, text);
  table.string_ids.emplace(text, id);
  return id;
}

bool is_scalar_type(const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::ScalarTypeType) return true;
  if (auto opt = type->cast<c10::OptionalType>()) {
    return opt->getElementType()->kind() == c10::TypeKind::ScalarTypeType;
  }
  return false;
}

std::unique_ptr<OpInfo> describe_op(const char* name, const char* overload) {
  auto info = std::make_unique<OpInfo>();
  info->name = name;
  info->overload = overload;
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

// Op info for a call, cached by the schema's name pointer (stable while the op is registered;
// the name is compared too in case a deregistered op's memory is reused).
OpInfo* op_info_locked(State& s, const char* name, const char* overload) {
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.ops_by_name_ptr.find(name);
  if (it != s.ops_by_name_ptr.end() && it->second->name == name && it->second->overload == overload) {
    return it->second;
  }
  OpInfo* info = nullptr;
  std::string full = std::string(name) + "." + overload;
  auto found = s.ops_by_name.find(full);
  if (found != s.ops_by_name.end()) {
    info = found->second;
  } else {
    auto fresh = describe_op(name, overload);
    fresh->id = static_cast<int64_t>(s.ops.size());
    info = fresh.get();
    s.ops.push_back(std::move(fresh));
    s.ops_by_name.emplace(full, info);
    s.described.store(static_cast<int64_t>(s.ops.size()));
  }
  if (s.ops_by_name_ptr.size() > kMaxCachedPointers) s.ops_by_name_ptr.clear();
  s.ops_by_name_ptr[name] = info;
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

void encode_values(Slot& s, const at::Tensor& t, KeyBuffer& key, bool& per_drain) {
  if (!c10::isIntegralType(t.scalar_type(), /*includeBool=*/false) || t.numel() > kMaxValues) return;
  at::DisableRecordFunctionGuard no_observers;  // our own copies must not be observed
  if (t.device().is_cpu()) {
    auto values = t.to(at::kLong).contiguous();
    const int64_t* data = values.const_data_ptr<int64_t>();
    key.push_back(kValues);
    key.push_back(values.numel());
    key.append(data, static_cast<size_t>(values.numel()));
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
  per_drain = true;
  s.pending_values.push_back(PendingValues{std::move(host), std::move(ready)});
}

void encode_tensor(Slot& s, const at::Tensor& t, KeyBuffer& key, int extra, bool& per_drain) {
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
  if (extra & kWithValues) encode_values(s, t, key, per_drain);
  if (extra & kWithDtype) {
    key.push_back(kTensorDtype);
    key.push_back(static_cast<int64_t>(t.scalar_type()));
  }
}

void push_double(KeyBuffer& key, double d) {
  int64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  key.push_back(bits);
}

void encode(Slot& s, ThreadTable& table, const c10::IValue& v, KeyBuffer& key, int extra, bool dtype,
            bool& per_drain) {
  if (v.isTensor()) {
    encode_tensor(s, v.toTensor(), key, extra, per_drain);
  } else if (v.isNone()) {
    key.push_back(kNone);
  } else if (v.isInt()) {
    key.push_back(dtype ? kDtype : kInt);
    key.push_back(v.toInt());
  } else if (v.isDouble()) {
    if (extra & kNoScalars) {
      key.push_back(kScalarNotKept);
    } else {
      key.push_back(kDouble);
      push_double(key, v.toDouble());
    }
  } else if (v.isBool()) {
    key.push_back(kBool);
    key.push_back(v.toBool());
  } else if (v.isString()) {
    key.push_back(kString);
    key.push_back(intern_string(table, v.toStringRef()));
  } else if (v.isIntList()) {
    auto list = v.toIntList();
    key.push_back(kIntList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (int64_t e : list) key.push_back(e);
  } else if (v.isDoubleList()) {
    auto list = v.toDoubleList();
    key.push_back(kDoubleList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (double e : list) push_double(key, e);
  } else if (v.isBoolList()) {
    auto list = v.toBoolList();
    key.push_back(kBoolList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (bool e : list) key.push_back(e);
  } else if (v.isTensorList()) {
    auto list = v.toTensorList();
    key.push_back(kList);
    key.push_back(static_cast<int64_t>(list.size()));
    for (const auto& t : list) encode_tensor(s, t, key, extra, per_drain);
  } else if (v.isList() || v.isTuple()) {
    auto elems = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
    key.push_back(kList);
    key.push_back(static_cast<int64_t>(elems.size()));
    for (const auto& e : elems) encode(s, table, e, key, extra, false, per_drain);
  } else {  // devices, generators, layouts, symbolic values: formulas do not read them
    key.push_back(kOpaque);
  }
}

bool is_default(const OpInfo& info, size_t i, const c10::IValue& v) {
  if (i >= info.defaults.size() || !info.defaults[i].has_value()) return false;
  if (v.isTensor() && v.toTensor().defined()) return false;
  return *info.defaults[i] == v;
}

}  // namespace

OpInfo* op_info(const char* name, const char* overload) {
  auto it = tls_ops.find(name);
  if (it != tls_ops.end()) {
    OpInfo* info = it->second;
    if (std::strcmp(info->name.c_str(), name) == 0 && std::strcmp(info->overload.c_str(), overload) == 0) {
      return info;
    }
  }
  if (std::strchr(name, ' ') != nullptr) return not_an_op();
  OpInfo* info = op_info_locked(state(), name, overload);
  if (tls_ops.size() > kMaxCachedPointers) tls_ops.clear();
  tls_ops[name] = info;
  return info;
}

void encode_input(Slot& s, ThreadTable& table, const OpInfo& info, size_t i, const c10::IValue& v,
                  KeyBuffer& key, int extra, bool& per_drain) {
  key.push_back(is_default(info, i, v) ? 1 : 0);
  if (i < info.no_values.size() && info.no_values[i]) extra &= ~kWithValues;
  encode(s, table, v, key, extra, i < info.dtype_arg.size() && info.dtype_arg[i], per_drain);
}

void encode_output(Slot& s, ThreadTable& table, const c10::IValue& v, KeyBuffer& key, int extra,
                   bool& per_drain) {
  encode(s, table, v, key, extra & kWithDtype, false, per_drain);
}

// (name, overload) of each op id from ``start`` on.
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

// Python's classification (REGISTRY.lookup) of op ids start, start + 1, ...: the observer keeps
// no rule of the registry, only these answers.
void set_op_classes(int64_t start, const std::vector<int64_t>& classes) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  TORCH_CHECK(start >= 0 && start + static_cast<int64_t>(classes.size()) <= static_cast<int64_t>(s.ops.size()),
              "flopcount: op classes for unknown op ids");
  for (size_t i = 0; i < classes.size(); ++i) {
    s.ops[static_cast<size_t>(start) + i]->klass.store(static_cast<int8_t>(classes[i]));
  }
  int64_t end = start + static_cast<int64_t>(classes.size());
  if (start <= s.classified.load() && end > s.classified.load()) s.classified.store(end);
}

}  // namespace flopcount_native
