// The native capture, one per active meter (a slot): by default a dispatch key's boxed fallback
// ("the capture key" below), else a RecordFunction observer registered as a thread-local callback;
// both hand each op to start_call / end_call. Like a TorchDispatchMode it follows the meter's thread and the autograd work it starts
// (autograd's worker threads inherit the thread-local state), and nested meters each count their
// block. Each thread aggregates its calls in its own key table (ThreadTable); drain merges them.
//
// Which ops are counted mirrors what a TorchDispatchMode (the dispatch backend) sees:
//   * an op is "seen" when it reaches a kernel below autograd. CompositeImplicitAutograd ops
//     decompose above that point while an autograd key is active (so their parts are seen
//     instead); under inference mode they are seen themselves.
//   * ops called from inside a seen op's kernel (autocast's re-call, native kernels calling other
//     ops) are not seen: a thread-local depth counts open seen ops.
//   * tensor-subclass wrappers (Python dispatch key, e.g. DTensor) are transparent: the subclass
//     runs its local ops, which are seen with local shapes; the wrapper op with global shapes not.

#include "native.h"

#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/graph_task.h>
#include <ATen/Operators.h>
#include <torch/library.h>

#include <cstring>

#include <algorithm>
#include <array>
#include <thread>
#include <tuple>
#include <utility>

namespace flopcount_native {

Slot& slot(int64_t i) {
  static Slot* slots = new Slot[kSlots];  // leaked on purpose, as state()
  TORCH_CHECK(i >= 0 && i < kSlots, "flopcount: no native meter slot ", i);
  return slots[i];
}

namespace {

std::mutex drain_mu[kSlots];  // one drain at a time per slot (drain swaps the tables' buffers)

// One seen op of one meter, from its start to its end (either capture).
struct OpCall {
  int64_t index = 0;  // meter slot
  bool record = false;
  bool per_drain = false;  // the key names this drain's device-value copies
  size_t num_returns = 0;
  int extra = kShapeOnly;
  ThreadTable* table = nullptr;
};

struct OpContext : at::ObserverContext {
  OpCall call;

  // RecordFunction owns one context per seen op and frees it at the op's end: a per-thread free
  // list recycles them instead of a heap allocation per op. (A context may end on another thread
  // than it began, e.g. autograd's; it then joins that thread's list.)
  static void* operator new(size_t size);
  static void operator delete(void* p) noexcept;
};

thread_local bool tls_contexts_gone = false;  // trivially destructible: valid while the thread exits
struct FreeList {
  std::vector<void*> items;
  ~FreeList() {
    tls_contexts_gone = true;
    for (void* p : items) ::operator delete(p);
    items.clear();
  }
};
thread_local FreeList tls_free_contexts;
constexpr size_t kMaxFreeContexts = 256;

void* OpContext::operator new(size_t size) {
  if (tls_contexts_gone) return ::operator new(size);
  auto& items = tls_free_contexts.items;
  if (size == sizeof(OpContext) && !items.empty()) {
    void* p = items.back();
    items.pop_back();
    return p;
  }
  return ::operator new(size);
}

void OpContext::operator delete(void* p) noexcept {
  if (tls_contexts_gone) return ::operator delete(p);
  auto& items = tls_free_contexts.items;
  if (items.size() < kMaxFreeContexts) {
    items.push_back(p);
  } else {
    ::operator delete(p);
  }
}

// The innermost backward module of graph task ``task``: cached per thread while the slot's stacks
// are unchanged (hooks.cpp bumps backward_version under the lock), so ops in backward take no lock.
struct BackwardCache {
  int64_t incarnation = -1, version = -1, task = -1, module = -1;
};

// What a thread holds for each meter slot, in one thread-local: this library's thread-locals cost
// a call (__tls_get_addr) in each function that reads them, so an op looks it up once and passes
// it on.
struct PerThread {
  int64_t depth[kSlots] = {};  // open seen ops: ops inside one are not seen
  // The key being built. Seen ops do not nest, so one buffer per thread and meter suffices.
  KeyBuffer key[kSlots];
  std::shared_ptr<ThreadTable> tables[kSlots];
  BackwardCache backward[kSlots];
  bool floor = false;  // the benchmark's dispatch_floor on this thread (the capture key)
};
thread_local PerThread tls_thread;

int64_t backward_module_of(PerThread& t, Slot& s, int64_t index, int64_t task) {
  BackwardCache& c = t.backward[index];
  int64_t version = s.backward_version.load(std::memory_order_acquire);
  int64_t incarnation = s.incarnation.load(std::memory_order_relaxed);
  if (c.version == version && c.task == task && c.incarnation == incarnation) return c.module;
  std::lock_guard<std::mutex> lock(s.mu);
  c.module = innermost_backward_locked(s, task);
  c.version = s.backward_version.load(std::memory_order_relaxed);
  c.task = task;
  c.incarnation = incarnation;
  return c.module;
}

// This thread's table for the slot's current meter, registered with the slot the first time.
ThreadTable& thread_table(PerThread& t, Slot& s, int64_t index) {
  auto& table = t.tables[index];
  int64_t incarnation = s.incarnation.load(std::memory_order_relaxed);
  if (!table || table->incarnation != incarnation) {
    table = std::make_shared<ThreadTable>();
    table->incarnation = incarnation;
    std::lock_guard<std::mutex> lock(s.mu);
    s.tables.push_back(table);
  }
  return *table;
}

// The table's counts, written while ``busy`` (see ThreadTable): drain waits for the flag to drop.
struct Writing {
  explicit Writing(ThreadTable& t) : table(t) {
    table.busy.store(true);
    counts = table.active.load();
  }
  ~Writing() { table.busy.store(false); }
  ThreadTable& table;
  Counts* counts;
};

// The key's id: from the thread's cache, else interned in the slot (once per distinct key and
// thread, under the slot's lock).
int64_t key_id(Slot& s, ThreadTable& table, const KeyBuffer& key, bool per_drain) {
  int64_t epoch = s.key_epoch.load(std::memory_order_relaxed);
  if (table.key_epoch != epoch) {
    table.ids.clear();
    table.key_epoch = epoch;
  }
  uint64_t hash = 0;
  if (!per_drain) {
    hash = key_hash(key.data(), key.size());
    int64_t cached = table.ids.find(key, hash);
    if (cached >= 0) return cached;
  }
  std::vector<int64_t> full = key.to_vector();  // a key new to this thread: the slot's tables hold vectors
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t id;
  if (per_drain) {
    id = s.next_key_id++;
    s.new_keys.emplace_back(id, std::move(full));
    return id;
  }
  auto it = s.key_ids.find(full);
  if (it != s.key_ids.end()) {
    id = it->second;
  } else {
    if (s.key_ids.size() >= kMaxKeys) {  // shapes that never repeat: start afresh
      s.key_ids.clear();
      s.keys_reset = true;
      s.planned.clear();
      s.key_epoch.fetch_add(1);
      table.ids.clear();
      table.key_epoch = s.key_epoch.load();
    }
    id = s.next_key_id++;
    s.key_ids.emplace(full, id);
    s.new_keys.emplace_back(id, std::move(full));
  }
  table.ids.insert(key, hash, id);
  return id;
}

// An op starts, for meter ``index``: true when it is seen (ops inside it are then not), with
// ``call`` set to end it (end_call). Both captures call this with the op's arguments.
bool start_call(PerThread& t, int64_t index, OpInfo* info, c10::ArrayRef<c10::IValue> inputs, OpCall& call) {
  int64_t& depth = t.depth[index];
  if (depth > 0) return false;  // inside a seen op's kernel
  Slot& s = slot(index);
  if (s.paused.load(std::memory_order_relaxed)) return false;
  if (!info->is_op) return false;
  c10::DispatchKeySet keys;
  for (const auto& v : inputs) {
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
  if (keys.has(c10::DispatchKey::Python)) return false;  // subclass wrapper: transparent
  if (keys.has(c10::DispatchKey::Meta)) return false;    // shape propagation: nothing computed
  if (info->implicit) {
    auto tls = c10::impl::tls_local_dispatch_key_set();
    auto effective = (keys | tls.included_) - tls.excluded_;
    if (effective.has_any(c10::autograd_dispatch_keyset)) return false;  // decomposes
  }
  ++depth;
  call = OpCall{};
  call.index = index;
  int8_t klass = info->klass.load(std::memory_order_relaxed);
  if (klass == kZero) return true;
  ThreadTable& table = thread_table(t, s, index);
  if (klass == kUncounted) {
    {
      Writing w(table);
      w.counts->at(s.generation.load()).uncounted[info->id] += 1;
    }
    if (s.strict.load() && !s.has_violation.load()) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.violation = info->name + (info->overload.empty() ? "" : "." + info->overload);
      s.has_violation.store(true);
    }
    return true;
  }
  bool optimizer = s.optimizer.load(std::memory_order_relaxed);
  // Auto steps: the first op with a formula after optimizer.step() opens the next step. (An op
  // not classified yet, first seen just there, does not: Python classifies ops at the next
  // context change, and optimizer.step() is one.)
  if ((klass == kFormula || klass == kFormulaShapes || klass == kFormulaValues) && !optimizer &&
      s.pending_boundary.load(std::memory_order_relaxed) && s.pending_boundary.exchange(false)) {
    s.generation.fetch_add(1);
    s.boundary_crossed.store(true);
  }
  int64_t task = torch::autograd::get_current_graph_task_id();
  int64_t module = -1;
  if (task != -1 && s.has_backward_modules.load(std::memory_order_relaxed)) {
    module = backward_module_of(t, s, index, task);
  }
  KeyBuffer& key = t.key[index];
  key.clear();
  key.push_back(info->id);
  key.push_back(s.context.load(std::memory_order_relaxed));
  key.push_back((c10::GradMode::is_enabled() ? 1 : 0) | (task != -1 ? 2 : 0));
  key.push_back(module);
  // Not classified yet: keep all that any formula could read (Python books it once it knows).
  call.extra = klass == kFormulaValues ? kWithValues
               : klass == kCollective  ? kWithDtype
               : klass == kUnknown     ? (kWithValues | kWithDtype)
               : klass == kFormulaShapes ? kNoScalars
                                       : kShapeOnly;
  bool per_drain = false;
  for (size_t i = 0; i < inputs.size(); ++i) encode_input(s, table, *info, i, inputs[i], key, call.extra, per_drain);
  call.record = true;
  call.per_drain = per_drain;
  call.num_returns = info->num_returns;
  call.table = &table;
  return true;
}

// A seen op ends: booked unless it did not run (``ran`` false: it threw before its kernel ran, e.g.
// non-reentrant checkpoint stops recomputing from autograd's saved-tensor hook).
void end_call(PerThread& t, const OpCall& call, c10::ArrayRef<c10::IValue> outputs, bool ran) {
  --t.depth[call.index];
  if (!call.record || !ran) return;
  Slot& s = slot(call.index);
  ThreadTable& table = *call.table;
  KeyBuffer& key = t.key[call.index];
  key.push_back(kOutputs);
  bool per_drain = call.per_drain;
  for (const auto& out : outputs) encode_output(s, table, out, key, call.extra, per_drain);
  int64_t id = key_id(s, table, key, per_drain);
  Writing w(table);
  w.counts->at(s.generation.load()).calls.add(id, 1);
}

// The RecordFunction capture's callbacks.
std::unique_ptr<at::ObserverContext> on_start(int64_t index, const at::RecordFunction& fn) {
  PerThread& t = tls_thread;
  if (t.depth[index] > 0) return nullptr;  // inside a seen op's kernel (checked before the lookup)
  OpInfo* info = op_info(fn.name(), fn.overload_name());
  if (!info->is_op) return nullptr;
  auto inputs = fn.inputs();
  OpCall call;
  if (!start_call(t, index, info, c10::ArrayRef<c10::IValue>(const_cast<c10::IValue*>(inputs.data()), inputs.size()), call)) {
    return nullptr;
  }
  auto ctx = std::make_unique<OpContext>();
  ctx->call = call;
  return ctx;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* observer_ctx) {
  if (observer_ctx == nullptr) return;
  const OpCall& call = static_cast<OpContext*>(observer_ctx)->call;
  // No outputs from an op that returns something: it threw before its kernel ran.
  const auto& outputs = fn.outputs();
  end_call(tls_thread, call, outputs, !(call.num_returns > 0 && outputs.empty()));
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

// Meter ``index``'s RecordFunction observer (thread-local when added: the observer capture, and
// the capture key's subclass watch).
at::RecordFunctionCallback observer_callback(int64_t index) {
  static const auto starts = start_table(std::make_index_sequence<kSlots>{});
  return at::RecordFunctionCallback(starts[static_cast<size_t>(index)], on_end)
      .needsInputs(true)
      .needsOutputs(true)
      .scopes({at::RecordScope::FUNCTION});
}


// ---- the capture key --------------------------------------------------------------------------
// A boxed fallback on a dispatch mode key (torch's TESTING_ONLY_GenericMode, which nothing else
// registers) sees each op where RecordFunction would, above autograd, without RecordFunction's
// per-event machinery (benchmarks/RESULTS.md: "a capture below the RecordFunction floor"). The key
// is included in the owner thread's dispatch key set; autograd's workers inherit it with the
// thread-local state. Which meters are here on a thread: each key meter registers a do-nothing
// thread-local RecordFunction callback for a scope that no aten op uses (the marker), disabled,
// which follows the same thread-local state; the fallback finds the markers in that state.
namespace {
constexpr auto kCaptureKey = c10::DispatchKey::TESTING_ONLY_GenericMode;
const c10::DispatchKeySet kBelowCaptureKey(c10::DispatchKeySet::FULL_AFTER, kCaptureKey);

std::atomic<uint64_t> marker_handles[kSlots];  // the key meters' markers (0: none)
std::atomic<uint32_t> key_meters{0};           // bit i: slot i captures by the key
thread_local uint32_t tls_owned_key_meters = 0;  // key meters enabled on this thread
// Once Dynamo has compiled, the key stays included on threads that have it: code compiled with it
// guards on the thread's dispatch keys, and would recompile without it (capture.py says when).
std::atomic<bool> keep_key_included{false};

std::unique_ptr<at::ObserverContext> marker_start(const at::RecordFunction&) { return nullptr; }

uint32_t key_meters_here() {
  uint32_t active = key_meters.load(std::memory_order_relaxed);
  if (active == 0) return 0;
  uint32_t here = 0;
  for (const auto& entry : at::get_record_function_tls_().sorted_tls_callbacks_) {
    if (entry.callback_.start() != &marker_start) continue;
    for (uint32_t bits = active; bits != 0; bits &= bits - 1) {  // the active slots only
      const int i = __builtin_ctz(bits);
      if (marker_handles[i].load(std::memory_order_relaxed) == entry.handle_) here |= 1u << i;
    }
  }
  return here;
}

void drop_key_if_unused() {
  if ((tls_owned_key_meters & key_meters.load()) != 0 || keep_key_included.load() || tls_thread.floor) return;
  c10::impl::tls_set_dispatch_key_included(kCaptureKey, false);
}

// A tensor subclass's __torch_dispatch__ runs with the capture key excluded: the meters that did
// not see its wrapper op watch the ops inside it through RecordFunction, for this call only.
struct SubclassWatch {
  explicit SubclassWatch(uint32_t meters) {
    for (int64_t i = 0; i < kSlots; ++i) {
      if (!(meters >> i & 1u)) continue;
      handles[count++] = at::addThreadLocalCallback(observer_callback(i));
    }
  }
  ~SubclassWatch() {
    for (int k = 0; k < count; ++k) at::removeCallback(handles[k]);
  }
  at::CallbackHandle handles[kSlots] = {};
  int count = 0;
};

// The key meters that record on this thread now (0: none; the op is passed on untouched). None
// where RecordFunction is off in the thread (the meter's own all-reduce, the extension's own
// copies), as for the observer.
uint32_t recording_meters(const PerThread& t) {
  if (t.floor || !at::isRecordFunctionEnabled()) return 0;
  uint32_t here = key_meters_here();
  if (here == 0) drop_key_if_unused();  // a stale key (a meter closed on another thread)
  return here;
}

// One op call at the key, for the meters ``here``, from its arguments to its returns: both the
// boxed fallback and the unboxed kernels (Pass) record through it. Ops inside a seen op are not
// seen, so when every meter saw it the key is excluded while it runs; the meters that did not see
// a tensor subclass's wrapper op watch its __torch_dispatch__. A call that never reaches ``ended``
// threw before its kernel ran (nothing booked).
class KeyCall {
 public:
  KeyCall(PerThread& t, uint32_t here, OpInfo* info, c10::DispatchKeySet keys, c10::ArrayRef<c10::IValue> inputs)
      : thread_(t) {
    uint32_t unseen = 0;
    for (int64_t i = 0; i < kSlots; ++i) {
      if (!(here >> i & 1u)) continue;
      if (start_call(thread_, i, info, inputs, calls_[seen_])) {
        ++seen_;
      } else {
        unseen |= 1u << i;
      }
    }
    if (unseen == 0) {
      hide_.emplace(kCaptureKey);
    } else if (keys.has(c10::DispatchKey::Python)) {
      watch_.emplace(unseen);
    }
  }
  void ended(c10::ArrayRef<c10::IValue> outputs) {
    hide_.reset();
    watch_.reset();
    for (int k = 0; k < seen_; ++k) end_call(thread_, calls_[k], outputs, true);
    seen_ = 0;
  }
  ~KeyCall() {
    hide_.reset();
    watch_.reset();
    for (int k = 0; k < seen_; ++k) end_call(thread_, calls_[k], {}, false);  // returns at once: nothing to book
  }
  KeyCall(const KeyCall&) = delete;
  KeyCall& operator=(const KeyCall&) = delete;

 private:
  PerThread& thread_;  // a call starts and ends on one thread (a C++ frame)
  OpCall calls_[kSlots];
  int seen_ = 0;
  c10::optional<c10::impl::ExcludeDispatchKeyGuard> hide_;
  c10::optional<SubclassWatch> watch_;
};

void key_fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::DispatchKeySet below = keys & kBelowCaptureKey;
  PerThread& t = tls_thread;
  uint32_t here = recording_meters(t);
  if (here == 0) {
    op.redispatchBoxed(below, stack);
    return;
  }
  const auto& schema = op.schema();
  OpInfo* info = op_info(schema.name().c_str(), schema.overload_name().c_str());
  const size_t num_inputs = schema.arguments().size();
  KeyCall call(t, here, info, keys, c10::ArrayRef<c10::IValue>(stack->data() + (stack->size() - num_inputs), num_inputs));
  op.redispatchBoxed(below, stack);
  const size_t num_outputs = schema.returns().size();
  call.ended(c10::ArrayRef<c10::IValue>(stack->data() + (stack->size() - num_outputs), num_outputs));
}

// An op's returns as the IValues a boxed call leaves on its stack.
template <class T>
std::array<c10::IValue, 1> returns_of(const T& value) {
  return {c10::IValue(value)};
}
template <class... Ts>
std::array<c10::IValue, sizeof...(Ts)> returns_of(const std::tuple<Ts...>& ts) {
  return std::apply([](const auto&... t) { return std::array<c10::IValue, sizeof...(Ts)>{c10::IValue(t)...}; }, ts);
}

// ---- the ops a step calls most, unboxed -------------------------------------------------------
// Boxing a call for the fallback and unboxing it again for the kernel below costs about 2,700
// instructions per call (benchmarks/RESULTS.md: twin, dispatch_floor), more than recording it.
// The ops listed in register_passes get an unboxed kernel at the key (Pass) that does what the
// fallback does without boxing:
//   * a decomposing op (CompositeImplicitAutograd, an autograd key in the call's keys): unseen
//     by every meter, it is redispatched as it is, so its parts reach the key;
//   * a zero op (Python classifies it ZERO; not implicit, no meta tensors): seen by every meter
//     that is here and not paused, which records nothing and hides the ops inside it, so it is
//     redispatched with the key excluded. Where the fallback would not hide, hiding changes
//     nothing: no meter records on this thread then (none here, paused, RecordFunction off,
//     inside a seen op);
//   * a call with the Python key (a tensor subclass, a dispatch mode), and every other call: its
//     arguments are boxed as the fallback would see them (no redispatch through the boxed path)
//     and recorded through the same KeyCall.
// So an op Python has not classified yet or gave a formula (one registered later too) is
// recorded, and a subclass's work inside a zero op is watched.
template <class Op, class Schema = typename Op::schema>
struct Pass;

template <class Op, class Ret, class... Args>
struct Pass<Op, Ret(Args...)> {
  static const c10::OperatorHandle& handle() {
    static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(Op::name, Op::overload_name);
    return op;
  }
  static OpInfo* info() {
    static OpInfo* const described = [] {
      const auto& schema = handle().schema();
      return op_info(schema.name().c_str(), schema.overload_name().c_str());
    }();
    return described;
  }
  static Ret call(c10::DispatchKeySet keys, Args... args) {
    OpInfo* const described = info();
    const c10::DispatchKeySet below = keys & kBelowCaptureKey;
    if (!keys.has(c10::DispatchKey::Python)) {
      if (described->implicit) {
        if (keys.has_any(c10::autograd_dispatch_keyset)) return Op::redispatch(below, std::forward<Args>(args)...);
      } else if (described->klass.load(std::memory_order_relaxed) == kZero && !keys.has(c10::DispatchKey::Meta)) {
        c10::impl::ExcludeDispatchKeyGuard hide(kCaptureKey);
        return Op::redispatch(below, std::forward<Args>(args)...);
      }
    }
    PerThread& t = tls_thread;
    uint32_t here = recording_meters(t);
    if (here == 0) return Op::redispatch(below, std::forward<Args>(args)...);
    // Recorded as the fallback records it, from the arguments as a boxed call would hold them.
    // (They are released when the call returns, as a boxed call's are: released before the op
    // runs, the last C++ reference of a Python-owned tensor drops inside autograd's backward,
    // which takes the GIL for it, about 1,600 times per twin step.)
    const torch::jit::Stack inputs = c10::impl::boxArgs<Args...>(args...);
    KeyCall recorded(t, here, described, keys, inputs);
    if constexpr (std::is_void_v<Ret>) {
      Op::redispatch(below, std::forward<Args>(args)...);
      recorded.ended({});
    } else {
      decltype(auto) result = Op::redispatch(below, std::forward<Args>(args)...);
      recorded.ended(returns_of(result));
      return result;
    }
  }
  static void impl(torch::Library& library) {
    std::string name = std::string(Op::name).substr(std::strlen("aten::"));
    if (*Op::overload_name != '\0') name += std::string(".") + Op::overload_name;
    library.impl(name.c_str(), TORCH_FN(call));
  }
};

template <class... Ops>
void impl_passes(torch::Library& library) {
  (Pass<Ops>::impl(library), ...);
}

// The ops a step calls most (formulas/zero.py says what is zero; Python's classification and the
// op's implicitness are read on every call, so the list decides speed only, never counts).
namespace ops = at::_ops;
void register_passes(torch::Library& library) {
  impl_passes<
      // views and metadata
      ops::view, ops::_unsafe_view, ops::_reshape_alias, ops::expand, ops::t, ops::transpose_int, ops::permute,
      ops::squeeze, ops::squeeze_dim, ops::squeeze_dims, ops::unsqueeze, ops::slice_Tensor, ops::select_int,
      ops::alias, ops::detach, ops::detach_, ops::as_strided, ops::split_Tensor, ops::split_with_sizes,
      ops::unbind_int, ops::unfold, ops::diagonal, ops::lift_fresh, ops::_local_scalar_dense, ops::view_as_real,
      ops::view_as_complex, ops::_conj, ops::_neg_view,
      // copies and casts
      ops::clone, ops::copy_, ops::_to_copy,
      // creation
      ops::empty_memory_format, ops::empty_like, ops::empty_strided, ops::zeros, ops::zeros_like, ops::ones,
      ops::ones_like, ops::full, ops::full_like, ops::fill__Scalar, ops::fill__Tensor, ops::zero_, ops::new_empty,
      ops::new_empty_strided, ops::new_zeros, ops::new_ones, ops::arange, ops::arange_start, ops::arange_start_step,
      ops::scalar_tensor,
      // indexing and layout
      ops::cat, ops::stack, ops::slice_backward, ops::select_backward, ops::constant_pad_nd, ops::embedding,
      ops::index_select, ops::gather, ops::masked_fill__Scalar, ops::masked_fill_Scalar, ops::where_self,
      ops::index_Tensor,
      // CompositeImplicitAutograd: they decompose under autograd
      ops::linear, ops::reshape, ops::item, ops::to_dtype_layout, ops::to_dtype, ops::to_device, ops::to_other,
      ops::narrow, ops::matmul, ops::scaled_dot_product_attention, ops::cross_entropy_loss, ops::nll_loss_nd,
      ops::nll_loss, ops::pad, ops::embedding_backward, ops::flatten_using_ints, ops::contiguous, ops::expand_as,
      ops::view_as, ops::type_as, ops::softmax_int, ops::log_softmax_int, ops::dropout, ops::layer_norm,
      ops::group_norm, ops::chunk, ops::unflatten_int, ops::einsum, ops::conv1d, ops::conv2d,
      ops::repeat_interleave_self_int,
      // with formulas: the pointwise ops, matmuls, reductions and losses of a transformer step and
      // its optimizer (AdamW, single-tensor and foreach)
      ops::mul_Tensor, ops::mul__Tensor, ops::mul_Scalar, ops::mul__Scalar, ops::add_Tensor, ops::add__Tensor,
      ops::add_Scalar, ops::add__Scalar, ops::sub_Tensor, ops::sub__Tensor, ops::rsub_Scalar, ops::div_Tensor,
      ops::div__Tensor, ops::div_Scalar, ops::div__Scalar, ops::neg, ops::sqrt, ops::rsqrt, ops::pow_Tensor_Scalar,
      ops::exp, ops::log, ops::tanh, ops::sigmoid, ops::cos, ops::sin, ops::lerp__Scalar, ops::lerp__Tensor,
      ops::addcmul_, ops::addcdiv_, ops::mm, ops::bmm, ops::addmm, ops::baddbmm, ops::sum, ops::sum_dim_IntList,
      ops::mean_dim, ops::silu, ops::silu_backward, ops::gelu, ops::gelu_backward, ops::relu, ops::threshold_backward,
      ops::_softmax, ops::_softmax_backward_data, ops::_log_softmax, ops::_log_softmax_backward_data,
      ops::nll_loss_forward, ops::nll_loss_backward, ops::embedding_dense_backward, ops::native_layer_norm,
      ops::native_layer_norm_backward, ops::_scaled_dot_product_flash_attention_for_cpu,
      ops::_scaled_dot_product_flash_attention_for_cpu_backward, ops::_foreach_mul__Scalar, ops::_foreach_mul__List,
      ops::_foreach_add__Scalar, ops::_foreach_add__List, ops::_foreach_lerp__Scalar, ops::_foreach_addcmul__Scalar,
      ops::_foreach_addcdiv__Scalar, ops::_foreach_sqrt, ops::_foreach_div__ScalarList, ops::_foreach_div__List>(library);
}

// Registered at the first key meter (or floor), never at load; one registration for the process.
// Registering writes the ops' dispatch tables, which other threads read without a lock; before the
// first key meter no thread has the key included, so none reads the entries written here.
void register_key_fallback() {
  static std::once_flag once;
  std::call_once(once, [] {
    static auto* library = new torch::Library(torch::Library::IMPL, "_", kCaptureKey, __FILE__, __LINE__);
    library->fallback(torch::CppFunction::makeFromBoxedFunction<&key_fallback>());
    static auto* passes = new torch::Library(torch::Library::IMPL, "aten", kCaptureKey, __FILE__, __LINE__);
    register_passes(*passes);
  });
}
}  // namespace

void reset_locked(Slot& s) {
  s.tables.clear();
  s.recent_planned.clear();
  s.pending_values.clear();
  s.key_ids.clear();
  s.new_keys.clear();
  s.planned.clear();
  s.backward_stacks.clear();
  s.backward_version.fetch_add(1);
  s.has_backward_modules = false;
  s.drained = 0;
  s.generation = 0;
  s.key_epoch.fetch_add(1);
  s.incarnation.fetch_add(1);
}

// Take one thread's counts (see ThreadTable) and add them to ``out`` (generation ``first`` first).
void merge(ThreadTable& table, int64_t first, std::vector<Generation>& out) {
  Counts* old = table.active.load();
  table.active.store(old == &table.buffers[0] ? &table.buffers[1] : &table.buffers[0]);
  while (table.busy.load()) std::this_thread::yield();  // a writer finishing one entry
  for (size_t g = 0; g < old->gens.size(); ++g) {
    int64_t number = std::max(old->first + static_cast<int64_t>(g), first);
    size_t at = static_cast<size_t>(number - first);
    if (out.size() <= at) out.resize(at + 1);
    Generation& into = out[at];
    old->gens[g].calls.for_each([&](int64_t id, int64_t calls) { into.calls.add(id, calls); });
    for (const auto& [id, calls] : old->gens[g].uncounted) into.uncounted[id] += calls;
  }
  old->recycle();
}

}  // namespace

// Turn a meter's capture on for this thread (and autograd work it starts); returns its slot.
// ``by_key``: capture through the key (else a RecordFunction observer).
int64_t enable(bool strict, bool by_key) {
  if (by_key) register_key_fallback();
  for (int64_t i = 0; i < kSlots; ++i) {
    Slot& s = slot(i);
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.in_use) continue;
    s.in_use = true;
    reset_locked(s);
    s.next_key_id = 0;
    s.keys_reset = false;
    s.module_names.clear();
    s.root_module = -1;
    s.violation.clear();
    s.has_violation = false;
    s.pending_boundary = false;
    s.boundary_crossed = false;
    s.optimizer = false;
    s.context = 0;
    s.strict = strict;
    s.by_key = by_key;
    if (by_key) {
      s.handle = at::addThreadLocalCallback(
          at::RecordFunctionCallback(marker_start).scopes({at::RecordScope::STATIC_RUNTIME_MODEL}));
      // Disabled, it still travels with the thread-local state, but RecordFunction runs it for no
      // scope: autograd sets that state around every backward node, and rebuilding the scopes'
      // active callbacks for an enabled marker cost about 300 instructions each time.
      at::disableCallback(*s.handle);
      marker_handles[i].store(*s.handle);
      key_meters.fetch_or(1u << i);
      tls_owned_key_meters |= 1u << i;
      c10::impl::tls_set_dispatch_key_included(kCaptureKey, true);
    } else {
      s.handle = at::addThreadLocalCallback(observer_callback(i));
    }
    return i;
  }
  TORCH_CHECK(false, "flopcount: more than ", kSlots, " nested native meters");
}

// Turn the capture off (normally on the thread that enabled it); drain() still returns what it
// holds. ``keep_key``: Dynamo has compiled, the key stays included where it is (see
// keep_key_included).
void disable(int64_t index, bool keep_key) {
  Slot& s = slot(index);
  c10::optional<at::CallbackHandle> handle;
  bool by_key;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    handle.swap(s.handle);
    by_key = s.by_key;
  }
  if (by_key && handle.has_value()) {
    key_meters.fetch_and(~(1u << index));
    marker_handles[index].store(0);
    if (keep_key) keep_key_included.store(true);
    tls_owned_key_meters &= ~(1u << index);
    drop_key_if_unused();  // on another thread than the owner, the owner's fallback drops it later
  }
  if (handle.has_value()) at::removeCallback(*handle);
}

bool captures_by_key(int64_t index) { return slot(index).by_key; }
bool key_included_here() { return c10::impl::tls_is_dispatch_key_included(kCaptureKey); }

void release(int64_t index) {
  disable(index, /*keep_key=*/false);  // (an earlier disable's keep_key stays in force)
  Slot& s = slot(index);
  std::lock_guard<std::mutex> lock(s.mu);
  reset_locked(s);
  s.in_use = false;
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
// those of set_planned; the keys first seen since the last drain ({key id: key}); the values of
// device tensors copied for value-dependent formulas ({slot: [values]}); whether earlier key ids
// were forgotten. Waiting on a copy's event blocks only until that copy is done (the copies are
// queued early in the step); it does not synchronise the device.
namespace {
constexpr size_t kRecentPlanned = 4;

// Empty drain's scratch (Slot::merged) for the next drain, keeping its first generations' arrays.
void recycle_merged(std::vector<Generation>& generations) {
  constexpr size_t kKept = 2;
  if (generations.size() > kKept) generations.resize(kKept);
  for (auto& gen : generations) gen.clear();
}  // a drain holds a step's end and the next one's start: parts alternate

// The dict of planned calls for ``planned`` (key id, calls, in the drain's order, which the trace's
// rows follow): a recent drain's own when it holds the same in the same order, else a new one,
// kept among the recent (drain_mu held).
py::object planned_dict(Slot& s, const std::vector<std::pair<int64_t, int64_t>>& planned) {
  auto& recent = s.recent_planned;
  for (size_t i = 0; i < recent.size(); ++i) {
    if (recent[i].first == planned) {
      py::object same = recent[i].second;
      std::rotate(recent.begin(), recent.begin() + static_cast<std::ptrdiff_t>(i), recent.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      return same;
    }
  }
  py::dict fresh;
  for (const auto& [id, calls] : planned) fresh[py::int_(id)] = py::int_(calls);
  if (planned.empty()) return std::move(fresh);
  recent.insert(recent.begin(), {planned, fresh});
  if (recent.size() > kRecentPlanned) recent.pop_back();
  return std::move(fresh);
}
}  // namespace

py::tuple drain(int64_t index) {
  Slot& s = slot(index);
  std::lock_guard<std::mutex> one_drain(drain_mu[index]);
  std::vector<std::shared_ptr<ThreadTable>> tables;
  int64_t first;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    tables = s.tables;
    first = s.drained;
  }
  std::vector<Generation>& generations = s.merged;  // its generations' arrays kept from the last drain
  recycle_merged(generations);  // empty (already, unless the last drain failed half way)
  for (auto& table : tables) merge(*table, first, generations);
  std::vector<PendingValues> pending;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> new_keys;
  bool reset = false;
  std::vector<std::vector<uint8_t>>& is_planned = s.drain_flags;  // per generation, in its calls' iteration order
  {
    std::lock_guard<std::mutex> lock(s.mu);
    int64_t last = s.generation.load();  // every write merged above was of a generation <= last
    if (last < first) last = first;
    generations.resize(static_cast<size_t>(last - first + 1));
    s.drained = last;
    if (is_planned.size() < generations.size()) is_planned.resize(generations.size());
    for (size_t g = 0; g < generations.size(); ++g) {
      const auto& gen = generations[g];
      auto& flags = is_planned[g];
      flags.clear();
      flags.reserve(gen.calls.size());
      gen.calls.for_each([&](int64_t key, int64_t) {
        auto id = static_cast<size_t>(key);
        flags.push_back(id < s.planned.size() ? s.planned[id] : 0);
      });
    }
    pending.swap(s.pending_values);
    new_keys.swap(s.new_keys);
    std::swap(reset, s.keys_reset);
    s.boundary_crossed = false;
  }
  py::dict values;
  at::DisableRecordFunctionGuard no_observers;  // the copies below are not the job's ops
  if (!pending.empty()) {  // (releasing the GIL costs a switch when another thread wants it)
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
    auto& planned = s.drain_planned;
    planned.clear();
    py::dict other;
    size_t i = 0;
    generations[g].calls.for_each([&](int64_t id, int64_t calls) {  // the order in which is_planned was filled
      if (is_planned[g][i++]) {
        planned.emplace_back(id, calls);
      } else {
        other[py::int_(id)] = py::int_(calls);
      }
    });
    out.append(py::make_tuple(planned_dict(s, planned), other, py::cast(generations[g].uncounted)));
  }
  recycle_merged(generations);
  py::dict keys;
  for (auto& [id, key] : new_keys) keys[py::int_(id)] = py::tuple(py::cast(key));
  return py::make_tuple(out, keys, values, reset);
}

// ---- benchmark instrument: the RecordFunction machinery alone ----------------------------------
// An observer registered like a meter's (thread-local, inputs and outputs, aten ops) whose
// callbacks do nothing: what any RecordFunction-based capture pays before it does any work
// (benchmarks/interleaved_step_overhead.py, variant observer_floor).
namespace {
std::unique_ptr<at::ObserverContext> floor_start(const at::RecordFunction&) { return nullptr; }
void floor_end(const at::RecordFunction&, at::ObserverContext*) {}

c10::optional<at::CallbackHandle>& floor_handle() {
  static c10::optional<at::CallbackHandle> handle;
  return handle;
}
}  // namespace

void floor_enable(bool inputs, bool outputs) {
  TORCH_CHECK(!floor_handle().has_value(), "flopcount: the observer floor is already on");
  floor_handle() = at::addThreadLocalCallback(at::RecordFunctionCallback(floor_start, floor_end)
                                                  .needsInputs(inputs)
                                                  .needsOutputs(outputs)
                                                  .scopes({at::RecordScope::FUNCTION}));
}

void floor_disable() {
  if (!floor_handle().has_value()) return;
  at::removeCallback(*floor_handle());
  floor_handle().reset();
}

// The same for a capture at the dispatcher instead of RecordFunction: the capture key's fallback
// switched on for this thread with no meter, so that it only passes each op on (variant
// dispatch_floor).
void dispatch_floor_enable(bool enabled) {
  register_key_fallback();
  tls_thread.floor = enabled;
  c10::impl::tls_set_dispatch_key_included(kCaptureKey, enabled);
}

}  // namespace flopcount_native
