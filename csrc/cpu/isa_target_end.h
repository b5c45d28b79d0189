// Closes the region isa_target_avx512.h or isa_target_avx2.h opened.
#pragma GCC pop_options
