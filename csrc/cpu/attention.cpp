// (being written: the attention CPU kernel)
namespace fmkernels::cpu {}
