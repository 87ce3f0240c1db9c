// (being written: the decode_attention CPU kernel)
namespace fmkernels::cpu {}
