/* Entry and interrupt stubs of the freestanding virtio-blk test guest.
 * The VMM enters _start in 64-bit mode with identity-mapped page tables and rsp set. */
    .section .text.start, "ax"
    .global _start
_start:
    cli
    call main
1:  hlt
    jmp 1b

    .text
/* An interrupt stub: save the caller-saved registers, call a C handler, return. */
    .macro ISR name, handler
    .global \name
\name:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    call \handler
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq
    .endm

#ifdef TICKER
    ISR isr_ged, on_ged
    ISR isr_timer, on_timer
#endif

    ISR isr_virtio, on_irq

/* One stub per exception vector (32 bytes apart): each loads its vector number, saves the
 * faulting rip (at 0(%rsp), or 8(%rsp) for vectors that push an error code) and reports. */
    .global isr_exceptions
    .balign 32
isr_exceptions:
    .set vec, 0
    .rept 32
    .balign 32
    mov $vec, %edi
    mov (%rsp), %rsi
    mov 8(%rsp), %rdx
    jmp exception_common
    .set vec, vec + 1
    .endr
exception_common:
    and $-16, %rsp
    call on_exception
2:  hlt
    jmp 2b
    .section .note.GNU-stack, "", @progbits
