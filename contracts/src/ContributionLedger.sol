// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {IAttestationQuorum} from "./interfaces/IAttestationQuorum.sol";
import {IModelRegistry} from "./interfaces/IModelRegistry.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";
import {IShareToken} from "./interfaces/IShareToken.sol";

/// @title ContributionLedger
/// @notice Per model and epoch, a quorum of validators attests a Merkle root of (node, compute units). During
/// the model's challenge window a quorum-signed Fraud verdict voids one leaf (and slashes its node) or the
/// whole root; afterwards each node's leaf is claimed once with a Merkle proof, minting `units` shares to the
/// node's operator. Settlement stores one root, so its gas does not depend on the number of contributors.
///
/// Rules that keep ownership equal to verified compute (see contracts/SECURITY.md):
/// - A voided root is burned for its (model, epoch): it can never be submitted again, whoever holds its
///   signatures; a replacement root is accepted. A root verdict (RootFraud) names the root it condemns, so it
///   cannot be replayed against the replacement.
/// - A leaf mints only if its node's stake was bonded when the root was submitted and could not be withdrawn
///   before the root's challenge window closed; so every verdict inside a window finds the stake the node had
///   when it contributed.
contract ContributionLedger is EIP712 {
    /// @notice A submitted epoch root.
    struct Epoch {
        bytes32 root;
        uint256 totalUnits; // sum of units over all leaves
        bytes32 receiptsHash; // commitment to the receipts the root was computed from
        uint64 submittedAt; // block timestamp of submission; 0 = never submitted
        bool voided; // voided by challengeRoot
        uint256 claimedUnits; // units minted so far
    }

    /// @notice EIP-712 type hash of EpochRoot.
    bytes32 public constant EPOCH_ROOT_TYPEHASH =
        keccak256("EpochRoot(uint256 modelId,uint64 epoch,bytes32 root,uint256 totalUnits,bytes32 receiptsHash)");
    /// @notice EIP-712 type hash of Fraud: a verdict against one node's leaf of an epoch (node != 0).
    bytes32 public constant FRAUD_TYPEHASH = keccak256("Fraud(uint256 modelId,uint64 epoch,address node,bytes32 evidence)");
    /// @notice EIP-712 type hash of RootFraud: a verdict that condemns one named root of an epoch.
    bytes32 public constant ROOT_FRAUD_TYPEHASH =
        keccak256("RootFraud(uint256 modelId,uint64 epoch,bytes32 root,bytes32 evidence)");
    /// @notice Largest totalUnits of a root (2^128). Every mint is at most its root's total, so a share token's
    /// supply stays below 2^128 * (number of roots) and can never overflow uint256.
    uint256 public constant MAX_ROOT_UNITS = 2 ** 128;

    /// @notice The model registry.
    IModelRegistry public immutable models;
    /// @notice The node registry.
    INodeRegistry public immutable nodes;
    /// @notice The attestation rule for roots and fraud verdicts.
    IAttestationQuorum public immutable quorum;
    /// @notice Share of a node's stake slashed for a fraudulent leaf, in basis points.
    uint16 public immutable slashBps;

    mapping(uint256 modelId => mapping(uint64 epoch => Epoch)) private _epochs;
    mapping(uint256 modelId => mapping(uint64 epoch => mapping(address node => bool))) private _leafVoided;
    mapping(uint256 modelId => mapping(uint64 epoch => mapping(address node => bool))) private _leafClaimed;
    mapping(uint256 modelId => mapping(uint64 epoch => mapping(bytes32 root => bool))) private _rootVoided;

    /// @notice The model is not training.
    /// @param modelId The model.
    /// @param status Its current status.
    error ContributionLedgerModelNotTraining(uint256 modelId, IModelRegistry.Status status);
    /// @notice The root is zero, or total units zero or above MAX_ROOT_UNITS.
    /// @param root The root submitted.
    /// @param totalUnits The total units submitted.
    error ContributionLedgerInvalidRoot(bytes32 root, uint256 totalUnits);
    /// @notice A live (non-voided) root already exists for this epoch.
    /// @param modelId The model.
    /// @param epoch The epoch.
    error ContributionLedgerEpochAlreadySubmitted(uint256 modelId, uint64 epoch);
    /// @notice This root was voided for this epoch and can never be submitted again.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param root The voided root.
    error ContributionLedgerRootWasVoided(uint256 modelId, uint64 epoch, bytes32 root);
    /// @notice No root was submitted for this epoch.
    /// @param modelId The model.
    /// @param epoch The epoch.
    error ContributionLedgerUnknownEpoch(uint256 modelId, uint64 epoch);
    /// @notice The quorum rejected the signatures.
    /// @param digest The EIP-712 digest the signatures had to sign.
    error ContributionLedgerQuorumRejected(bytes32 digest);
    /// @notice The challenge window has closed.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param closedAt When the window closed.
    error ContributionLedgerChallengeWindowClosed(uint256 modelId, uint64 epoch, uint64 closedAt);
    /// @notice The challenge window is still open.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param closesAt When the window closes.
    error ContributionLedgerChallengeWindowOpen(uint256 modelId, uint64 epoch, uint64 closesAt);
    /// @notice The root was voided.
    /// @param modelId The model.
    /// @param epoch The epoch.
    error ContributionLedgerRootVoided(uint256 modelId, uint64 epoch);
    /// @notice The leaf was voided.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The node of the leaf.
    error ContributionLedgerLeafVoided(uint256 modelId, uint64 epoch, address node);
    /// @notice The leaf was already claimed.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The node of the leaf.
    error ContributionLedgerLeafAlreadyClaimed(uint256 modelId, uint64 epoch, address node);
    /// @notice The Merkle proof does not prove the leaf.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The node of the leaf.
    /// @param units The units claimed.
    error ContributionLedgerInvalidProof(uint256 modelId, uint64 epoch, address node, uint256 units);
    /// @notice The node is not registered.
    /// @param node The node.
    error ContributionLedgerUnknownNode(address node);
    /// @notice The node's stake did not back the whole challenge window: its current bond started after the root
    /// was submitted, or it could be withdrawn before the window closed. The leaf never mints.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The node of the leaf.
    /// @param bondedAt When the node's current bond started.
    /// @param withdrawableAt When the bond's stake can first be withdrawn (2^64-1 while active).
    /// @param submittedAt When the root was submitted.
    /// @param closesAt When the root's challenge window closes.
    error ContributionLedgerStakeNotLocked(
        uint256 modelId, uint64 epoch, address node, uint64 bondedAt, uint64 withdrawableAt, uint64 submittedAt, uint64 closesAt
    );
    /// @notice The node is zero, or units zero.
    /// @param node The node.
    /// @param units The units.
    error ContributionLedgerInvalidLeaf(address node, uint256 units);
    /// @notice Claims would exceed the root's total units.
    /// @param claimed Units claimed including this leaf (2^256-1 if that overflows).
    /// @param totalUnits The root's total units.
    error ContributionLedgerUnitsExceeded(uint256 claimed, uint256 totalUnits);
    /// @notice slashBps is above 10000.
    /// @param slashBps The value given.
    error ContributionLedgerInvalidSlashBps(uint16 slashBps);

    /// @notice An epoch root was submitted.
    event EpochRootSubmitted(
        uint256 indexed modelId, uint64 indexed epoch, bytes32 root, uint256 totalUnits, bytes32 receiptsHash
    );
    /// @notice A leaf was voided by a fraud verdict.
    event LeafChallenged(uint256 indexed modelId, uint64 indexed epoch, address indexed node, bytes32 evidence, uint256 slashed);
    /// @notice A root was voided by a fraud verdict.
    event RootChallenged(uint256 indexed modelId, uint64 indexed epoch, bytes32 evidence);
    /// @notice A leaf was claimed and its shares minted.
    event LeafClaimed(uint256 indexed modelId, uint64 indexed epoch, address indexed node, address operator, uint256 units);

    /// @param models_ The model registry.
    /// @param nodes_ The node registry.
    /// @param quorum_ The attestation rule.
    /// @param slashBps_ Share of stake slashed per fraudulent leaf (basis points, <= 10000).
    constructor(IModelRegistry models_, INodeRegistry nodes_, IAttestationQuorum quorum_, uint16 slashBps_)
        EIP712("PMN ContributionLedger", "1")
    {
        if (slashBps_ > 10_000) revert ContributionLedgerInvalidSlashBps(slashBps_);
        models = models_;
        nodes = nodes_;
        quorum = quorum_;
        slashBps = slashBps_;
    }

    /// @notice Submits the attested Merkle root of an epoch. A voided root may be replaced by another root; the
    /// voided root itself is refused for good (its signatures carry no nonce, so state decides).
    /// @param modelId The model (must be training).
    /// @param epoch The epoch number.
    /// @param root Merkle root over leaves (modelId, epoch, node, units).
    /// @param totalUnits Sum of units over all leaves.
    /// @param receiptsHash Commitment to the underlying receipts.
    /// @param signatures Validator signatures over EpochRoot, sorted by signer.
    function submitEpochRoot(
        uint256 modelId,
        uint64 epoch,
        bytes32 root,
        uint256 totalUnits,
        bytes32 receiptsHash,
        bytes[] calldata signatures
    ) external {
        IModelRegistry.Status status = models.statusOf(modelId);
        if (status != IModelRegistry.Status.Training) revert ContributionLedgerModelNotTraining(modelId, status);
        if (root == bytes32(0) || totalUnits == 0 || totalUnits > MAX_ROOT_UNITS) {
            revert ContributionLedgerInvalidRoot(root, totalUnits);
        }
        Epoch storage e = _epochs[modelId][epoch];
        if (e.submittedAt != 0 && !e.voided) revert ContributionLedgerEpochAlreadySubmitted(modelId, epoch);
        if (_rootVoided[modelId][epoch][root]) revert ContributionLedgerRootWasVoided(modelId, epoch, root);
        bytes32 digest = epochRootDigest(modelId, epoch, root, totalUnits, receiptsHash);
        _attest(digest, signatures);
        _epochs[modelId][epoch] = Epoch(root, totalUnits, receiptsHash, uint64(block.timestamp), false, 0);
        emit EpochRootSubmitted(modelId, epoch, root, totalUnits, receiptsHash);
    }

    /// @notice Voids one node's leaf and slashes the node, given a quorum-signed Fraud verdict, inside the window.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The condemned node (non-zero).
    /// @param evidence Commitment to the evidence (e.g. hash of the failed spot check).
    /// @param signatures Validator signatures over Fraud, sorted by signer.
    function challengeLeaf(uint256 modelId, uint64 epoch, address node, bytes32 evidence, bytes[] calldata signatures)
        external
    {
        if (node == address(0)) revert ContributionLedgerInvalidLeaf(node, 0);
        _openEpoch(modelId, epoch);
        if (_leafVoided[modelId][epoch][node]) revert ContributionLedgerLeafVoided(modelId, epoch, node);
        _attest(fraudDigest(modelId, epoch, node, evidence), signatures);
        _leafVoided[modelId][epoch][node] = true;
        uint256 slashed = nodes.slash(node, Math.mulDiv(nodes.stakeOf(node), slashBps, 10_000), evidence);
        emit LeafChallenged(modelId, epoch, node, evidence, slashed);
    }

    /// @notice Voids the epoch's live root for good, given a quorum-signed RootFraud verdict naming that root.
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param evidence Commitment to the evidence.
    /// @param signatures Validator signatures over RootFraud(modelId, epoch, root, evidence), sorted by signer.
    function challengeRoot(uint256 modelId, uint64 epoch, bytes32 evidence, bytes[] calldata signatures) external {
        Epoch storage e = _openEpoch(modelId, epoch);
        _attest(rootFraudDigest(modelId, epoch, e.root, evidence), signatures);
        e.voided = true;
        _rootVoided[modelId][epoch][e.root] = true;
        emit RootChallenged(modelId, epoch, evidence);
    }

    /// @notice After the challenge window, mints a leaf's `units` shares to its node's operator; once per leaf.
    /// Anyone may call it. The node's bond must have started by the root's submission and must not have been
    /// withdrawable before the window closed (else ContributionLedgerStakeNotLocked).
    /// @param modelId The model.
    /// @param epoch The epoch.
    /// @param node The node in the leaf.
    /// @param units The units in the leaf.
    /// @param proof Merkle proof of the leaf (OpenZeppelin sorted-pair tree).
    function claimLeaf(uint256 modelId, uint64 epoch, address node, uint256 units, bytes32[] calldata proof) external {
        if (node == address(0) || units == 0) revert ContributionLedgerInvalidLeaf(node, units);
        Epoch storage e = _epochs[modelId][epoch];
        if (e.submittedAt == 0) revert ContributionLedgerUnknownEpoch(modelId, epoch);
        if (e.voided) revert ContributionLedgerRootVoided(modelId, epoch);
        uint64 closesAt = e.submittedAt + models.challengeWindowOf(modelId);
        if (block.timestamp < closesAt) revert ContributionLedgerChallengeWindowOpen(modelId, epoch, closesAt);
        if (_leafVoided[modelId][epoch][node]) revert ContributionLedgerLeafVoided(modelId, epoch, node);
        if (_leafClaimed[modelId][epoch][node]) revert ContributionLedgerLeafAlreadyClaimed(modelId, epoch, node);
        bytes32 leaf = leafHash(modelId, epoch, node, units);
        if (!MerkleProof.verifyCalldata(proof, e.root, leaf)) {
            revert ContributionLedgerInvalidProof(modelId, epoch, node, units);
        }
        (address operator, uint64 bondedAt, uint64 withdrawableAt) = nodes.bondOf(node);
        if (operator == address(0)) revert ContributionLedgerUnknownNode(node);
        if (bondedAt > e.submittedAt || withdrawableAt < closesAt) {
            revert ContributionLedgerStakeNotLocked(modelId, epoch, node, bondedAt, withdrawableAt, e.submittedAt, closesAt);
        }
        uint256 claimed = Math.saturatingAdd(e.claimedUnits, units);
        if (claimed > e.totalUnits) revert ContributionLedgerUnitsExceeded(claimed, e.totalUnits);
        e.claimedUnits = claimed;
        _leafClaimed[modelId][epoch][node] = true;
        emit LeafClaimed(modelId, epoch, node, operator, units);
        IShareToken(models.shareTokenOf(modelId)).mint(operator, units);
    }

    /// @notice The record of an epoch.
    /// @param modelId The model.
    /// @param epoch The epoch.
    function getEpoch(uint256 modelId, uint64 epoch) external view returns (Epoch memory) {
        return _epochs[modelId][epoch];
    }

    /// @notice Whether a leaf was voided.
    function isLeafVoided(uint256 modelId, uint64 epoch, address node) external view returns (bool) {
        return _leafVoided[modelId][epoch][node];
    }

    /// @notice Whether `root` was voided for this epoch (and so can never be submitted again).
    function isRootVoided(uint256 modelId, uint64 epoch, bytes32 root) external view returns (bool) {
        return _rootVoided[modelId][epoch][root];
    }

    /// @notice Whether a leaf was claimed.
    function isLeafClaimed(uint256 modelId, uint64 epoch, address node) external view returns (bool) {
        return _leafClaimed[modelId][epoch][node];
    }

    /// @notice The EIP-712 domain separator (for off-chain signers).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The EIP-712 digest validators sign for an epoch root.
    function epochRootDigest(uint256 modelId, uint64 epoch, bytes32 root, uint256 totalUnits, bytes32 receiptsHash)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(EPOCH_ROOT_TYPEHASH, modelId, epoch, root, totalUnits, receiptsHash)));
    }

    /// @notice The EIP-712 digest validators sign for a fraud verdict.
    function fraudDigest(uint256 modelId, uint64 epoch, address node, bytes32 evidence) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(FRAUD_TYPEHASH, modelId, epoch, node, evidence)));
    }

    /// @notice The EIP-712 digest validators sign for a verdict that voids the named root of an epoch.
    function rootFraudDigest(uint256 modelId, uint64 epoch, bytes32 root, bytes32 evidence)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(ROOT_FRAUD_TYPEHASH, modelId, epoch, root, evidence)));
    }

    /// @notice The Merkle leaf of (modelId, epoch, node, units), OpenZeppelin StandardMerkleTree encoding.
    function leafHash(uint256 modelId, uint64 epoch, address node, uint256 units) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(modelId, epoch, node, units))));
    }

    function _openEpoch(uint256 modelId, uint64 epoch) private view returns (Epoch storage e) {
        e = _epochs[modelId][epoch];
        if (e.submittedAt == 0) revert ContributionLedgerUnknownEpoch(modelId, epoch);
        if (e.voided) revert ContributionLedgerRootVoided(modelId, epoch);
        uint64 closesAt = e.submittedAt + models.challengeWindowOf(modelId);
        if (block.timestamp >= closesAt) revert ContributionLedgerChallengeWindowClosed(modelId, epoch, closesAt);
    }

    function _attest(bytes32 digest, bytes[] calldata signatures) private view {
        if (!quorum.verify(digest, signatures)) revert ContributionLedgerQuorumRejected(digest);
    }
}
